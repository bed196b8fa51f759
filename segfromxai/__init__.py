"""segfromxai: bootstrap segmentation pseudo-labels from classifier explanations."""

__version__ = "0.1.0"

from .explainers import EXPLAINERS, explain  # noqa: E402

__all__ = ["EXPLAINERS", "__version__", "explain"]
