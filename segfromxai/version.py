"""The package version (the one place it is written; :mod:`segfromxai` re-exports it)."""

__version__ = "0.1.0"
