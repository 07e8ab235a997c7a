"""The distributed tile-bag executor (Campanella et al.): encoder on N DDP ranks, aggregator on rank 0.

Launched by torchrun, one process per rank (gloo on CPU, NCCL when every rank has its own GPU)::

    torchrun --standalone --nproc-per-node 3 -m slidetrain.bench.distributed_equivalence parallel ...

Per step (one slide), as the authors' script (REFERENCE_NOTES "Multi-GPU end-to-end"):

1. ranks 1..N encode their k_r tiles: f_r = encoder(x_r), (k_r, D), float32;
2. sizes are exchanged (all_gather of (k_r, D)), f_r padded to max k_r, barrier, `gather` to rank 0,
   which trims and concatenates: F = [f_1; ...; f_N], (sum k_r, D). Uneven k_r work (evaluation
   with every tile of a slide);
3. rank 0: F as a leaf with grad, aggregator forward, slide loss, backward -> G = dL/dF;
4. G split by k_r, padded, barrier, `scatter`; rank r trims its g_r, (k_r, D);
5. ranks 1..N backpropagate the pseudo-loss N * sum(f_r * g_r): DDP averages the N ranks'
   gradients, so the factor N restores sum_r df_r/dtheta g_r = dL/dtheta (the paper's l_e);
6. each side steps its own optimiser (GradScaler on either side under fp16 AMP).

The tile-bag trainer's `executor: distributed` (ranked.py) runs its training loop on this engine.

Every collective runs under the process group's timeout (init_process_group(timeout=...)); when one
fails or times out, a gloo `monitored_barrier` over all ranks finds the ranks that stopped answering,
and the step raises DistributedError naming them, so a dead or hung rank ends the job instead of
hanging it. Rank 0 writes checkpoints (the encoder state comes from rank 1 by gather_object).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from slidetrain.errors import ConfigError, DistributedError
from slidetrain.io import atomic_path
from slidetrain.train.tilebag.encoder_stages import keep_frozen_norms_in_eval
from slidetrain.train.tilebag.executors import full_precision

log = logging.getLogger(__name__)

LossFn = Callable[[object, Tensor], Tensor]


@dataclass
class Topology:
    """Who this process is: rank 0 aggregates, ranks 1..N encode (DDP on `encoder_group`)."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    encoder_group: dist.ProcessGroup | None
    monitor_group: dist.ProcessGroup | None  # gloo, all ranks: monitored_barrier names dead ranks
    timeout_s: float

    @property
    def n_encoders(self) -> int:
        return self.world_size - 1

    @property
    def is_aggregator(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        # gloo gathers/scatters host tensors; NCCL the device's own
        return self.device if self.backend == "nccl" else torch.device("cpu")


def pick_backend(backend: str, world_size: int) -> str:
    """auto = NCCL when every rank can have its own GPU (NCCL refuses two ranks on one GPU), else gloo."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"distributed.backend: expected auto | gloo | nccl, got {backend!r}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    return backend


def init_distributed(backend: str = "auto", timeout_s: float = 300.0, device: str = "auto") -> Topology:
    """Join the torchrun job (RANK, WORLD_SIZE, MASTER_ADDR... from the environment) and make the groups."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "distributed executor: RANK/WORLD_SIZE not set; launch with torchrun "
            "(torchrun --standalone --nproc-per-node N+1 ...)"
        )
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size < 2:
        raise ConfigError(
            f"distributed executor: world size {world_size}; expected >= 2 "
            "(rank 0 aggregator + at least one encoder rank)"
        )
    backend = pick_backend(backend, world_size)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    wanted = torch.device(device)
    if wanted.type == "cuda":
        # "cuda:i" pins every rank to GPU i; bare "cuda" spreads them (ranks may share a GPU under gloo).
        # Always an explicit index: set_device and the memory calls reject or misread a bare "cuda".
        index = wanted.index if wanted.index is not None else local_rank % torch.cuda.device_count()
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout, device_id=dev if backend == "nccl" else None)
    rank = dist.get_rank()
    # new_group is collective: every rank calls it, in the same order
    # The encoders' DDP group waits twice as long: when an encoder rank hangs, the other encoders sit
    # in DDP's all-reduce with it while rank 0 sits in the size exchange. Rank 0 must time out first,
    # so that its monitored barrier names the rank that hung rather than a bystander that timed out.
    encoder_group = dist.new_group(ranks=list(range(1, world_size)), timeout=2 * timeout)
    monitor_group = dist.new_group(ranks=list(range(world_size)), timeout=timeout, backend="gloo")
    return Topology(rank, world_size, backend, dev, encoder_group if rank > 0 else None, monitor_group, timeout_s)


def ddp_buffer_kwargs(sync: bool) -> dict[str, bool]:
    """DDP's keyword for syncing buffers at each forward, in the installed torch's spelling.

    torch 2.13 added `forward_sync_buffers` and deprecated `broadcast_buffers`; older torch (2.11 on
    the GPU machine) knows only `broadcast_buffers` and raises TypeError on the new name. The two
    differ only in the sync at construction, where our ranks' buffers are equal anyway (same seed).
    """
    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": sync} if "forward_sync_buffers" in params else {"broadcast_buffers": sync}


@functools.cache
def differentiable_all_reduce_impl() -> str | None:
    """Which all-reduce with a backward the installed torch offers, for the gloo SyncBN below.

    "funcol": torch.distributed._functional_collectives.all_reduce, once its op has an autograd
    kernel (newer torch registers one; `torch.distributed.nn.functional` is deprecated there);
    "nn.functional": the autograd Function of torch.distributed.nn.functional (older torch);
    None: neither (the caller skips SyncBN with a reason).
    """
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key("_c10d_functional::all_reduce", "Autograd"):
            return "funcol"
    except (AttributeError, RuntimeError):  # a private API: its absence only means "look further"
        pass
    try:
        from torch.distributed.nn.functional import all_reduce  # noqa: F401
    except ImportError:
        return None
    return "nn.functional"


def _all_reduce_sum(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum of `x` over `group`, differentiable (its backward sums the gradient over the group)."""
    impl = differentiable_all_reduce_impl()
    if impl == "funcol":
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))
    if impl == "nn.functional":
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x, dist.ReduceOp.SUM, group)
    raise DistributedError(
        "SyncBN under gloo needs a differentiable all_reduce; this torch "
        f"{torch.__version__} has none (see differentiable_all_reduce_impl)"
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Collectives:
    """The step's collectives, each named and timed, each failing with the ranks that stopped answering.

    Features and gradients travel in torch's default dtype (float32 unless a caller sets float64).
    """

    def __init__(self, topo: Topology):
        self.topo = topo
        self.step = -1
        self.seconds = 0.0  # time inside gather/scatter transfers (after their barriers)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, dist.DistError) as exc:  # gloo/NCCL timeouts and lost peers land here
            raise DistributedError(self._diagnose(what, exc)) from exc

    def _diagnose(self, what: str, exc: BaseException) -> str:
        msg = (
            f"rank {self.topo.rank}: {what} at step {self.step} failed after at most "
            f"{self.topo.timeout_s:g} s: {str(exc).splitlines()[0][:300]}"
        )
        if self.topo.monitor_group is None:
            return msg
        try:  # rank 0 learns which ranks are gone; the others learn whether rank 0 is
            dist.monitored_barrier(
                self.topo.monitor_group, timeout=timedelta(seconds=min(10.0, self.topo.timeout_s)), wait_all_ranks=True
            )
            return msg + "; every rank answered the monitored barrier afterwards"
        except Exception as barrier_exc:  # noqa: BLE001 - its message is the diagnosis
            return msg + f"; monitored barrier: {str(barrier_exc).splitlines()[0][:300]}"

    def barrier(self, what: str) -> None:
        with self.guard(f"barrier before {what}"):
            dist.barrier()

    def sizes(self, k: int, d: int) -> list[tuple[int, int]]:
        """all_gather (k_r, D) of every rank (rank 0 sends (0, 0)); -> [(k_0, D_0), ..., (k_N, D_N)]."""
        mine = torch.tensor([k, d], dtype=torch.int64, device=self.topo.comm_device)
        out = [torch.empty_like(mine) for _ in range(self.topo.world_size)]
        with self.guard("size exchange (all_gather)"):
            dist.all_gather(out, mine)
        return [(int(t[0]), int(t[1])) for t in out]

    def gather(self, features: Tensor | None, sizes: list[tuple[int, int]]) -> list[Tensor] | None:
        """Encoder ranks send (k_r, D); rank 0 returns [f_1, ..., f_N] trimmed to their k_r."""
        kmax = max(k for k, _ in sizes[1:])
        d = sizes[1][1]
        comm = self.topo.comm_device
        if self.topo.is_aggregator:
            send = torch.zeros(kmax, d, device=comm)  # rank 0's own slot is a dummy (the authors' too)
            recv = [torch.empty(kmax, d, device=comm) for _ in range(self.topo.world_size)]
        else:
            send = torch.zeros(kmax, d, device=comm)
            send[: features.shape[0]] = features.detach().to(comm)  # (kmax, D), zero-padded
            recv = None
        self.barrier("gather")
        t0 = time.perf_counter()
        with self.guard("feature gather"):
            dist.gather(send, recv, dst=0)
        self.seconds += time.perf_counter() - t0
        if recv is None:
            return None
        return [recv[r][: sizes[r][0]] for r in range(1, self.topo.world_size)]

    def scatter(self, chunks: list[Tensor] | None, sizes: list[tuple[int, int]]) -> Tensor | None:
        """Rank 0 sends g_r (k_r, D) to rank r; rank r returns its g_r."""
        kmax = max(k for k, _ in sizes[1:])
        d = sizes[1][1]
        comm = self.topo.comm_device
        recv = torch.empty(kmax, d, device=comm)
        send = None
        if self.topo.is_aggregator:
            send = [torch.zeros(kmax, d, device=comm)]  # dummy for rank 0
            for g in chunks:
                padded = torch.zeros(kmax, d, device=comm)
                padded[: g.shape[0]] = g.to(comm)
                send.append(padded)
        self.barrier("scatter")
        t0 = time.perf_counter()
        with self.guard("gradient scatter"):
            dist.scatter(recv, send, src=0)
        self.seconds += time.perf_counter() - t0
        if self.topo.is_aggregator:
            return None
        return recv[: sizes[self.topo.rank][0]]


class _AllReduceSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics span the encoder group, for gloo (CPU, or ranks sharing a GPU).

    PyTorch's nn.SyncBatchNorm refuses CPU input ("expected input tensor to be on GPU") and is meant
    for NCCL, so elsewhere the global sums go through a differentiable all_reduce (`_all_reduce_sum`: its
    backward all-reduces the gradient), and autograd does the rest. With NCCL, nn.SyncBatchNorm is used.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group: dist.ProcessGroup):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.group = group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, ...)
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        count = torch.tensor([float(x.numel() // c)], dtype=x.dtype, device=x.device)
        # two passes (mean, then centred squares) as BatchNorm's own kernel: E[x^2] - mean^2 in fp32
        # loses digits when |mean| >> std
        sums = _all_reduce_sum(torch.cat([x.sum(dims), count]), self.group)
        n = sums[-1]
        mean = sums[:c] / n  # (C,); the all_reduce's backward all-reduces the gradient
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = x - mean.reshape(shape)
        var = _all_reduce_sum((centred * centred).sum(dims), self.group) / n  # (C,)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centred * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, group: dist.ProcessGroup, backend: str) -> nn.Module:
    """Every BatchNorm synchronised over `group`: nn.SyncBatchNorm with NCCL, the variant above otherwise."""
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _AllReduceSyncBatchNorm(module, group)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, group, backend))
    return module


@dataclass
class StepTimes:
    seconds: float = 0.0
    comm_seconds: float = 0.0


@dataclass
class DistributedEngine:
    """One slide per step across the ranks. Build it on every rank with identically seeded modules.

    encoder: (B, 3, P, P) -> (B, D), kept (and DDP-wrapped) on ranks 1..N only.
    aggregator: (K, D) -> output for `loss_fn(output, label)`, kept on rank 0 only.
    make_optimizer(module) -> torch.optim.Optimizer, called on the side that keeps the module.
    amp: the paper's "half" strategy (fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU).
    """

    topo: Topology
    encoder: nn.Module
    aggregator: nn.Module
    loss_fn: LossFn
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    amp: bool = False
    sync_bn: bool = False
    #: private: the pseudo-loss factor; None = N (correct). The tests set 1.0 to show the check fails.
    _pseudo_loss_factor: float | None = None
    comm: Collectives = field(init=False)

    def __post_init__(self) -> None:
        self.comm = Collectives(self.topo)
        dev = self.topo.device
        self.amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
        use_scaler = self.amp and dev.type == "cuda"
        self.scaler = torch.amp.GradScaler(dev.type) if use_scaler else None
        if self.topo.is_aggregator:
            self.model: nn.Module = self.aggregator.to(dev)
            self.encoder = None  # rank 0 never runs the encoder
        else:
            enc = self.encoder
            if self.sync_bn:
                enc = convert_sync_batchnorm(enc, self.topo.encoder_group, self.topo.backend)
            enc = enc.to(dev)
            self.ddp = DDP(
                enc,
                process_group=self.topo.encoder_group,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                **ddp_buffer_kwargs(not self.sync_bn),
            )  # SyncBN stats agree already
            self.model = enc
            self.aggregator = None
        self.optimizer = self.make_optimizer(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.topo.device.type, dtype=self.amp_dtype)

    @property
    def pseudo_loss_factor(self) -> float:
        return float(self.topo.n_encoders) if self._pseudo_loss_factor is None else self._pseudo_loss_factor

    # -- one training step --------------------------------------------------------------------
    def forward_backward(self, tiles: Tensor | None, label: Tensor | None, step: int, loss_scale: float = 1.0) -> float:
        """Gradients of one slide added to `.grad` on every rank; returns the loss on rank 0, nan elsewhere.

        tiles: this encoder rank's (k_r, 3, P, P) share of the bag (None on rank 0);
        label: 0-d int64 (read on rank 0 only). loss_scale: 1 / accumulation.
        """
        self.comm.step = step
        self.model.train()
        keep_frozen_norms_in_eval(self.model)  # freeze_blocks: frozen BatchNorm statistics never move
        if self.topo.is_aggregator:
            return self._aggregator_side(label, loss_scale)
        self._encoder_side(tiles)
        return float("nan")

    def _encoder_side(self, tiles: Tensor) -> None:
        with self.autocast():
            f = self.ddp(tiles.to(self.topo.device, non_blocking=True))  # (k_r, D)
        f = full_precision(f).contiguous()  # fp32 (or fp64)
        sizes = self.comm.sizes(f.shape[0], f.shape[1])
        self.comm.gather(f, sizes)
        g = self.comm.scatter(None, sizes).to(f.device)  # (k_r, D), dL/df_r (loss-scaled, unscaled by AMP)
        pseudo = (f * g).sum() * self.pseudo_loss_factor  # DDP divides by N
        (self.scaler.scale(pseudo) if self.scaler is not None else pseudo).backward()

    def _aggregator_side(self, label: Tensor, loss_scale: float) -> float:
        sizes = self.comm.sizes(0, 0)
        parts = self.comm.gather(None, sizes)
        feats = torch.cat(parts).to(self.topo.device).requires_grad_()  # (sum k_r, D), the graph's leaf
        with self.autocast():
            out = self.aggregator(feats)
            loss = self.loss_fn(out, label.to(self.topo.device))
        scaled = full_precision(loss) * loss_scale
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        g = feats.grad  # (sum k_r, D)
        if self.scaler is not None:
            g = g / self.scaler.get_scale()  # the encoders' own scaler scales their pseudo-loss
        self.comm.scatter(list(torch.split(g, [k for k, _ in sizes[1:]])), sizes)
        return float(loss.detach())

    def optimizer_step(self, grad_clip: float = 0.0) -> None:
        """Step this rank's optimiser (DDP has already averaged the encoder ranks' gradients)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, tiles: Tensor | None, label: Tensor | None, step: int) -> tuple[float, StepTimes]:
        comm0 = self.comm.seconds
        t0 = time.perf_counter()
        loss = self.forward_backward(tiles, label, step)
        self.optimizer_step()
        return loss, StepTimes(time.perf_counter() - t0, self.comm.seconds - comm0)

    # -- evaluation on the same ranks ---------------------------------------------------------
    @torch.no_grad()
    def predict(self, tiles: Tensor | None, chunk: int = 256, step: int = -1):
        """Aggregator output for one slide (rank 0; None elsewhere). tiles: this rank's share, any size.

        The encoder runs in eval mode through the bare module (not DDP: ranks may need different
        numbers of chunks, and DDP's forward would expect the same number of calls on every rank).
        """
        self.model.eval()
        if self.topo.is_aggregator:
            return self.predict_features(None, step)
        outs = []
        for part in torch.split(tiles, chunk) if len(tiles) else []:
            with self.autocast():
                outs.append(full_precision(self.model(part.to(self.topo.device))))  # (c, D)
        return self.predict_features(torch.cat(outs) if outs else None, step)

    @torch.no_grad()
    def predict_features(self, features: Tensor | None, step: int = -1):
        """The aggregator step of evaluation: encoder ranks hand in their share's features (k_r, D),
        rank 0 gathers them in rank order and returns the aggregator's output (None elsewhere).

        For callers that encode their share themselves (the tile-bag trainer: chunks read by a
        DataLoader, an eval-mode copy of the encoder)."""
        self.comm.step = step
        if self.topo.is_aggregator:
            self.model.eval()
            sizes = self.comm.sizes(0, 0)
            feats = torch.cat(self.comm.gather(None, sizes)).to(self.topo.device)  # (K, D)
            with self.autocast():
                return self.aggregator(feats)
        if features is None or len(features) == 0:
            raise DistributedError(
                f"rank {self.topo.rank}: empty tile share at evaluation step {step}; "
                "give every encoder rank at least one tile"
            )
        features = full_precision(features).contiguous()  # (k_r, D)
        sizes = self.comm.sizes(features.shape[0], features.shape[1])
        self.comm.gather(features, sizes)
        return None

    # -- checkpoints (rank 0 writes) ----------------------------------------------------------
    def state(self) -> dict:
        """This rank's part: its module, optimiser, scaler and RNG."""
        rng = {"torch": torch.get_rng_state()}
        if self.topo.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.topo.device)
        part = {
            "rng": rng,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        if self.topo.is_aggregator or self.topo.rank == 1:  # encoder ranks hold the same weights (DDP)
            part["model"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return _to_cpu(part)

    def gather_state(self, extra: dict | None = None) -> list[dict] | None:
        """Every rank's state (and its own `extra`), gathered to rank 0 (gather_object); None elsewhere."""
        parts = [None] * self.topo.world_size if self.topo.is_aggregator else None
        with self.comm.guard("checkpoint gather"):
            dist.gather_object({**self.state(), "extra": _to_cpu(extra or {})}, parts, dst=0)
        return parts

    def restore_state(self, parts: list[dict], world_size: int, where: str = "checkpoint") -> dict:
        """Restore this rank's part of `gather_state`'s list; returns this rank's extra."""
        if world_size != self.topo.world_size:
            raise ConfigError(
                f"{where}: written by {world_size} ranks, this job has "
                f"{self.topo.world_size}; resume with the same --nproc-per-node"
            )
        part = parts[self.topo.rank]
        self.model.load_state_dict(parts[0 if self.topo.is_aggregator else 1]["model"])
        self.optimizer.load_state_dict(part["optimizer"])
        if self.scaler is not None and part["scaler"] is not None:
            self.scaler.load_state_dict(part["scaler"])
        torch.set_rng_state(part["rng"]["torch"])
        if "cuda" in part["rng"] and self.topo.device.type == "cuda":
            torch.cuda.set_rng_state(part["rng"]["cuda"], self.topo.device)
        return part["extra"]

    def save_checkpoint(self, path: Path, step: int, extra: dict | None = None) -> None:
        """Every rank hands its state (and its own `extra`) to rank 0 (gather_object); rank 0 writes one file."""
        self.comm.step = step
        parts = self.gather_state(extra)
        if self.topo.is_aggregator:
            with atomic_path(path) as tmp:
                torch.save({"step": step, "world_size": self.topo.world_size, "ranks": parts}, tmp)
        self.comm.barrier("checkpoint written")  # no rank runs ahead of a checkpoint being written

    def load_checkpoint(self, path: Path) -> dict | None:
        """Restore this rank's part; returns {step, extra: this rank's extra} (None when there is no file)."""
        path = Path(path)
        if not path.exists():
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        extra = self.restore_state(ckpt["ranks"], ckpt["world_size"], where=str(path))
        return {"step": ckpt["step"], "extra": extra}


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def split_bag(n_tiles: int, n_ranks: int) -> list[slice]:
    """Contiguous shares of a bag over the encoder ranks, sizes differing by at most one."""
    base, extra = divmod(n_tiles, n_ranks)
    bounds = [0]
    for r in range(n_ranks):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return [slice(bounds[r], bounds[r + 1]) for r in range(n_ranks)]
