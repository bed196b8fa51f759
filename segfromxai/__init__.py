"""segfromxai: bootstrap segmentation pseudo-labels from classifier explanations."""

from .explainers import EXPLAINERS, explain
from .version import __version__

__all__ = ["EXPLAINERS", "__version__", "explain"]
