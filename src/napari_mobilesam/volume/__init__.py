"""Whole volumes: propagation of objects through z, automatic segmentation and z-stitching."""
