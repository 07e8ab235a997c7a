"""Partitioned execution of CNNs on inputs too large for their activations.

`geometry` maps output regions to the input regions they need and computes a
region with full-image padding semantics; `streaming` runs a trunk tile by
tile forward and backward (StreamingCNN) with gradients equal to plain
backprop. No knowledge of slides: the input is any (N, C, H, W) tensor.
"""

from slidetrain.partitioned.geometry import (
    PartitionError,
    Window,
    as_node,
    check_partitionable,
    register_adapter,
)
from slidetrain.partitioned.streaming import TILE_MODES, StreamingEngine, Tile, TilePlan

__all__ = [
    "TILE_MODES",
    "PartitionError",
    "StreamingEngine",
    "Tile",
    "TilePlan",
    "Window",
    "as_node",
    "check_partitionable",
    "register_adapter",
]
