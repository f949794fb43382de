"""A procedural, BreakHis-shaped, multi-magnification H&E dataset: the embedded default."""

from smse.synth.generator import generate, preview

__all__ = ["generate", "preview"]
