"""segfromxai: bootstrap segmentation pseudo-labels from classifier explanations."""

__version__ = "0.1.0"
