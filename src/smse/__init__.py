"""Magnification-independent histopathology classification with similarity-based multi-scale embeddings."""

__version__ = "0.1.0"
