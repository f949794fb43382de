"""Backbones by name and the embedding network with its classifier head."""

from smse.models.backbones import BACKBONES, create_backbone, register_backbone
from smse.models.embedder import Embedder, Heads

__all__ = ["BACKBONES", "Embedder", "Heads", "create_backbone", "register_backbone"]
