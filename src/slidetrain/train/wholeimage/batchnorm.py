"""BatchNorm calibration: running statistics set once from the training slides, then frozen.

`calibrate_bn` (default off: the reference starts from ImageNet statistics)
sets every backbone BatchNorm's running statistics once, before training, from
the normalised training slides, and keeps them frozen afterwards as the method
does. A randomly initialised backbone (`weights: none`) has identity
statistics, under which its activations grow by orders of magnitude per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from slidetrain.errors import SlidetrainError


@torch.no_grad()
def calibrate_batchnorm(root: nn.Module, run: Callable[[Tensor], Any], images: Iterable[Tensor]) -> int:
    """Set the running statistics of every BatchNorm under `root` from `images`; returns their count.

    Each BN's statistics are reset and replaced by the cumulative average
    (momentum None) of the per-image statistics it sees while `run(image)`
    runs with the BNs in training mode (so each layer sees the inputs its
    calibrated predecessors give it); then every BN is back in eval mode with
    its momentum restored: the statistics stay frozen during training.
    """
    bns = [m for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        for image in images:
            run(image)
            n += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    if n == 0:
        raise SlidetrainError("calibrate_bn: no training slides to calibrate BatchNorm on")
    return n
