"""pmvis: Ray-distributed experimentation platform for box-supervised video instance segmentation."""

__version__ = "0.1.0"
