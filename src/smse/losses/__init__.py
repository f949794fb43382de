"""Metric losses (pair, triplet) with in-batch mining, classification losses (RFL and baselines), neighbourhood
preservation, the objective."""

from smse.losses.classification import (
    CLASSIFICATION_LOSSES,
    class_balance,
    make_classification_loss,
)
from smse.losses.metric import (
    METRIC_LOSSES,
    CrossMagnificationMiner,
    PairLoss,
    TripletLoss,
    make_metric_loss,
    mine_pairs,
    mine_triplets,
    pairs_to_pml,
)
from smse.losses.objective import Objective
from smse.losses.structure import NeighbourhoodLoss

__all__ = [
    "CLASSIFICATION_LOSSES",
    "METRIC_LOSSES",
    "CrossMagnificationMiner",
    "NeighbourhoodLoss",
    "Objective",
    "PairLoss",
    "TripletLoss",
    "class_balance",
    "make_classification_loss",
    "make_metric_loss",
    "mine_pairs",
    "mine_triplets",
    "pairs_to_pml",
]
