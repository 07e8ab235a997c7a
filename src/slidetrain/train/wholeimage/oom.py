"""Out-of-memory handling of whole-image training: recognise the error, crop the slide for a retry.

The authors crop 1/6 off each edge, retry once and then return a zero loss (the
slide is silently skipped). Here `on_oom="error"` raises `SlideOOMError`
naming the image size, and `on_oom="crop"` crops and retries up to
`oom_retries` times (`crop_edges`), reports the size trained on, and raises if
it still does not fit (the learners' `train_slide`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slidetrain.errors import SlidetrainError


class SlideOOMError(SlidetrainError):
    """A slide did not fit in memory (after the allowed crops)."""


def is_oom_error(err: BaseException) -> bool:
    """True for CUDA and CPU allocator out-of-memory errors."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


def crop_edges(image: Tensor, fraction: float = 1 / 6) -> Tensor:
    """(3, H, W) -> the centre with `fraction` of each side cut off each edge (the authors' OOM retry)."""
    _, height, width = image.shape
    dh, dw = int(height * fraction), int(width * fraction)
    return image[:, dh : height - dh, dw : width - dw]
