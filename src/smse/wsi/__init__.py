"""Whole-slide images: one reader, tissue detection, concentric multi-magnification tiles, slide prediction."""

from smse.wsi.export import read_labels, write_tiles
from smse.wsi.reader import Slide, available_backends, magnification_mpp, open_slide
from smse.wsi.tiles import TilePlan, TileSpec, plan_tiles

__all__ = [
    "Slide",
    "TilePlan",
    "TileSpec",
    "available_backends",
    "magnification_mpp",
    "open_slide",
    "plan_tiles",
    "read_labels",
    "write_tiles",
]
