"""The `offload` executor (Big-Layers): the tile encoder runs on the offload engine.

The bag's activations through the stem and the first `stages` stages live in host RAM; each
convolution and BatchNorm (training mode, statistics over the whole bag) runs on sub-tensors
of at most `max_transfer_mb` on the device (slidetrain.partitioned.offload_engine). The rest of the
encoder and the aggregator run on the device in one autograd graph, so after `step` every
`.grad` holds what `plain` leaves there (tests/test_tilebag_offload.py).

A frozen encoder has no backward and nothing to offload: it runs as `plain` does.
"""

from __future__ import annotations

from torch import nn

from slidetrain.errors import ConfigError
from slidetrain.partitioned.offload_engine import STAGES, OffloadEncoder, OffloadEngine
from slidetrain.train.tilebag.executors import (
    Executor,
    StepResult,
    _backward,
    _detached,
    encode,
    full_precision,
    register_executor,
)


@register_executor("offload")
class OffloadExecutor(Executor):
    """`stages`: residual stages offloaded after the stem (0..4); `max_transfer_mb`: the engine's device budget."""

    #: used when the trainer builds the executor by name alone (tests lower both to force partitions:
    #: an offloaded layer's weight-gradient buffers count in the budget, so a tiny one takes few stages)
    default_max_transfer_mb: float = 256.0
    default_stages: int = len(STAGES)

    def __init__(self, stages: int | None = None, max_transfer_mb: float | None = None):
        stages = self.default_stages if stages is None else stages
        max_transfer_mb = self.default_max_transfer_mb if max_transfer_mb is None else max_transfer_mb
        if not 0 <= stages <= len(STAGES):
            raise ConfigError(f"offload executor: stages must be in 0..{len(STAGES)}, got {stages}")
        if max_transfer_mb <= 0:
            raise ConfigError(f"offload executor: max_transfer_mb must be > 0, got {max_transfer_mb}")
        self.stages, self.max_transfer_bytes = stages, int(max_transfer_mb * 2**20)
        self._wrapped: tuple[int, str, OffloadEncoder] | None = None

    def offloaded(self, encoder: nn.Module, device) -> OffloadEncoder:
        """The engine's view of `encoder` (built once; it shares the encoder's parameters)."""
        key = (id(encoder), str(device))
        if self._wrapped is None or self._wrapped[:2] != key:
            if not hasattr(encoder, "trunk") or not hasattr(encoder, "pool"):
                raise ConfigError(
                    f"executor offload: the encoder {type(encoder).__name__} is not a ResNet trunk + pooling "
                    f"(models.encoders' resnet18 / resnet34)"
                )
            engine = OffloadEngine(device, self.max_transfer_bytes)
            self._wrapped = (*key, OffloadEncoder(encoder, self.stages, engine))
        return self._wrapped[2]

    def step(self, tiles, encoder, aggregator, label, loss_fn, ctx):
        if not ctx.train_encoder:
            features = encode(encoder, tiles, ctx)  # no graph: the same as plain
        else:
            wrapped = self.offloaded(encoder, ctx.device)
            with ctx.autocast():
                features = wrapped(tiles.cpu())  # host bag in; (K, D) on the device out
            features = full_precision(features)  # as `encode`: AMP's half -> float32
        with ctx.autocast():
            out = aggregator(features)
            loss = loss_fn(out, label.to(ctx.device))
        _backward(loss, ctx)
        return StepResult(float(loss.detach()), _detached(out), len(tiles))
