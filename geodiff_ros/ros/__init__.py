"""Thin ROS 2 layer of geodiff_ros: message conversion, parameters, QoS, diagnostics and the ``geodiff`` node.

This is the only subpackage that imports rclpy or ``*_msgs``; importing it does not start ROS.
"""
