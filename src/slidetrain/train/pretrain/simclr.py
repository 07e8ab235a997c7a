"""Self-supervised pretraining of a ResNet tile encoder (SimCLR) on a cohort no split ever sees.

Why SimCLR: the objective needs no label and no lesion truth (two augmented views of a tile are
pulled together, views of other tiles pushed apart), it trains ONE network (no momentum encoder or
predictor as in BYOL/DINO, so a CPU step costs one forward and backward of the encoder), and with
the batch's other tiles as negatives it does not collapse at the small batches a CPU allows. The
papers start from ImageNet ResNets; this stands in for them on the embedded synthetic default,
where nothing may be downloaded.

What it trains: the torchvision ResNet (same module names), its `fc` replaced by a projection head
(Linear-BN-ReLU-Linear, as SimCLR v1) that is dropped afterwards. BatchNorm runs in training mode,
so the saved running statistics are those of real tiles (a random network's identity statistics are
what `calibrate_bn` exists for). `encoder.pt` is the trunk's state dict without `fc`, so every
`weights:` key that takes a local state dict takes it (slidetrain.models.encoders.load_resnet).

Resumable: a checkpoint every `checkpoint_every` steps; the batch and views of step t are drawn
from generators seeded by (seed, t), so a resumed run trains exactly what an uninterrupted one does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.errors import ConfigError
from slidetrain.train import common
from slidetrain.train.pretrain.views import ViewSettings, two_views

log = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50")


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "resnet34"
    steps: int = 300
    batch_size: int = 64  # tiles per step (2 views each: 2 x batch_size images)
    lr: float = 1.0e-3  # AdamW, linear warm-up then cosine to 0
    warmup_steps: int = 20
    weight_decay: float = 1.0e-6
    temperature: float = 0.2
    projection_dim: int = 128
    seed: int = 0
    checkpoint_every: int = 25
    views: ViewSettings = field(default_factory=ViewSettings)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"pretrain.archs: expected one of {list(ARCHS)}, got {self.arch!r}")
        if self.steps < 1 or self.batch_size < 2:
            raise ConfigError(f"pretrain: expected steps >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")


class ContrastiveNet(nn.Module):
    """ResNet trunk + projection head: (B, 3, H, W) -> (B, projection_dim)."""

    def __init__(self, arch: str, projection_dim: int, seed: int):
        super().__init__()
        from slidetrain.models.resnet import resnet

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.trunk = resnet(arch)
            dim = self.trunk.fc.in_features
            self.trunk.fc = nn.Identity()
            self.head = nn.Sequential(
                nn.Linear(dim, dim, bias=False),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),
                nn.Linear(dim, projection_dim),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))

    def encoder_state(self) -> dict[str, Tensor]:
        """The trunk's state dict under torchvision's names, without `fc` (load_resnet accepts it)."""
        return {k: v.detach().clone() for k, v in self.trunk.state_dict().items() if not k.startswith("fc.")}


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """SimCLR's loss over 2B views, and the fraction of views whose nearest other view is their pair."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    loss = F.cross_entropy(sim, target)
    pair_acc = (sim.argmax(dim=1) == target).float().mean()
    return loss, pair_acc


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def _step_batch(tiles: Tensor, cfg: PretrainConfig, step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randperm(len(tiles), generator=gen)[: cfg.batch_size]
    return two_views(tiles[idx], cfg.views, gen)


def pretrain(tiles: Tensor, cfg: PretrainConfig, out_dir: Path) -> dict[str, Tensor]:
    """Train on uint8 tiles (N, 3, P, P); writes history.csv and resumes from checkpoint.pt in `out_dir`."""
    if len(tiles) < cfg.batch_size:
        raise ConfigError(f"pretrain: the cohort holds {len(tiles)} tiles, fewer than batch_size {cfg.batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    net = ContrastiveNet(cfg.arch, cfg.projection_dim, cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path, history = out_dir / "checkpoint.pt", []
    start = _resume(net, opt, history, ckpt_path, cfg)
    net.train()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        v1, v2 = _step_batch(tiles, cfg, step)
        loss, pair_acc = nt_xent(net(v1), net(v2), cfg.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain {cfg.arch}: loss {loss.item()} at step {step}; lower pretrain.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(
            {"step": step + 1, "loss": loss.item(), "pair_accuracy": pair_acc.item(), "lr": lr_at(step, cfg)}
        )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state = {"net": net.state_dict(), "opt": opt.state_dict(), "history": history, "cfg": asdict(cfg)}
            common.save_checkpoint(ckpt_path, state)
            common.write_history(out_dir / "history.csv", history)
            log.info("step %d/%d loss %.3f pair accuracy %.2f", step + 1, cfg.steps, loss.item(), pair_acc.item())
            common.after_epoch_checkpoint(step + 1)
    return net.encoder_state()


def _resume(net: ContrastiveNet, opt, history: list, ckpt_path: Path, cfg: PretrainConfig) -> int:
    """Load the checkpoint when it was written under the same settings; the steps already done."""
    state = common.load_checkpoint(ckpt_path)
    if state is None:
        return 0
    if state["cfg"] != asdict(cfg):
        log.info("checkpoint %s was written under other settings; starting over", ckpt_path)
        return 0
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["opt"])
    history.extend(state["history"])
    log.info("resuming %s after step %d", ckpt_path, len(history))
    return len(history)
