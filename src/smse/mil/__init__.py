"""Slide-level learning from slide labels: bags of tile embeddings, attention pooling, cross-validation."""

from smse.mil.bags import Bag, bags_from_embeddings
from smse.mil.models import POOLS, SlideModel
from smse.mil.train import SlideConfig, train_slides

__all__ = ["Bag", "bags_from_embeddings", "POOLS", "SlideModel", "SlideConfig", "train_slides"]
