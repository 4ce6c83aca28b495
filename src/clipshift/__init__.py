"""clipshift: a reproducible lab for robust generalization in CLIP models."""

__version__ = "0.1.0"
