"""The bag tool (``geodiff_bag``): rosbag2 recordings read and written with ``rosbags`` (no rosbag2 needed).

- storage.py: open, read, write and salvage mcap / sqlite3 bags; message (de)serialisation
- live.py: play and record over DDS (the only module here that imports rclpy)
- process.py / parallel.py: run the model over a bag offline (one process, or one worker per device)
- export.py: colour/depth pairs as an RGB-D manifest folder for fine-tuning and evaluation
- synthetic.py: a small synthetic RGB-D bag (the demo's fallback, the tests' known scene)
- cli.py: the ``geodiff_bag`` command; report.py: its tables
Message conversion is shared with the node: ``geodiff_ros.ros.conversions``.
"""
