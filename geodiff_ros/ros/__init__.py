"""Thin ROS 2 layer of geodiff_ros: message conversion, parameters, QoS, diagnostics and the ``geodiff`` node.

This subpackage and the bag tool's live play/record (``geodiff_ros.bag.live``) are the only code that imports rclpy
or ``*_msgs``; importing it does not start ROS. The node is node.py (lifecycle, parameters, diagnostics) with its
worker threads in worker.py and its process entry in process.py. Nothing here imports the bag tool: the demo that
runs the node on a recorded bag is ``geodiff_ros.cli.demo``, above both.
"""
