"""ResNet34 cut into K locally supervised modules (Zhang et al., MICCAI 2022).

Facts reproduced from the authors' code (cvlab-stonybrook/local_learning_wsi):

- torchvision ResNet34 with ``conv1.stride = 3``, cut into a 9-entry list:
  stem (conv1, bn1, relu, maxpool), layer1[0], layer1[1], layer1[2],
  layer2[0:2], layer2[2:4], layer3[0:3], layer3[3:6], layer4.
- Module k (1..K, K in {4, 8}) runs entries (k-1)*g+1 .. k*g with g = 8 // K.
  The stem (entry 0) is frozen and run under no_grad outside the modules.
- Every backbone BatchNorm stays in eval mode while training.
- Modules 1..K-1 get an auxiliary net: a "1c2f" conv + gated-attention
  classifier and a random feature reconstruction (RFR) decoder. Module K is
  trained with the final head.

Where the description we were handed and the code differ, the code is the
default and the other reading is an option:

- The "norm" after the classifier conv is ``GroupNorm(C, C)`` in the code
  (config ``head_norm: group``); ``head_norm: batch`` gives BatchNorm2d.
- The classifier conv has no bias (it is followed by a norm).
- Attention dropout acts on the softmaxed attention weights.
- The RFR decoder's middle width is the module's output width.

RFR is a fixed cost per slide (10 crops of up to 128 x 128 at module 1,
decoded at the input's resolution), so on small images (about 1-2k px a
side) local learning needs more memory and time than E2E; the savings of
the paper's Table 2 appear on whole slides at 5x (8k px a side and more).

Memory on a whole slide, in U = one 64 x H/6 x W/6 float32 map (0.43 GiB
at 8698 x 7496): E2E holds about 32 U at its peak; local learning's peak is
module 1, i.e. the image (1.7 U), module 1's autograd graph (its input plus
4 maps per 64-channel block: K=4 two blocks, K=8 one) and that graph's
backward transients (CPU/oneDNN: about 4 U for K=4, 3 U for K=8), plus the
fixed model, optimiser and RFR cost; measured on CPU (bench.local_memory)
about 15 U (47 % of E2E) for K=4 and 11 U (35 %) for K=8. That is plain
autograd's floor for this cut; going lower would take recomputation. The
stem runs in bands (`stem_bands`) so that its 8 U transient stays below
that peak, and the RFR decoder makes no copy it does not need.

Two guards the code lacks, which only matter on maps far smaller than a real
slide at 5x (our tests and the synthetic dataset): a map smaller than the
classifier's conv kernel is zero-padded to the kernel size, and when the conv
output has a single spatial position the per-channel norm over positions is
undefined (GroupNorm would return a constant), so it is skipped.

Launch: these are building blocks; ``slidetrain.train.wholeimage.registry.build_learner``
assembles them into a learner.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn

from slidetrain.configs.image import ALLOWED_K, CHECKPOINTING  # noqa: F401 (re-exported)
from slidetrain.errors import ConfigError
from slidetrain.models.encoders import load_resnet
from slidetrain.partitioned import StreamingEngine

#: names of the 9 entries, in order (entry 0 is the frozen stem)
ENTRY_NAMES: tuple[str, ...] = (
    "stem",
    "layer1.0",
    "layer1.1",
    "layer1.2",
    "layer2.0-1",
    "layer2.2-3",
    "layer3.0-2",
    "layer3.3-5",
    "layer4",
)
#: output channels of each entry
ENTRY_OUT_CHANNELS: tuple[int, ...] = (64, 64, 64, 64, 128, 128, 256, 256, 512)
#: spatial downsampling of each entry relative to its input
ENTRY_STRIDES: tuple[int, ...] = (6, 1, 1, 1, 2, 1, 2, 1, 2)
STEM_STRIDE = 3  # conv1 stride in the authors' code (torchvision: 2)
MAX_K = 8


# --------------------------------------------------------------------------- backbone


def load_resnet34(weights: str = "none") -> torchvision.models.ResNet:
    """torchvision ResNet34 with `weights`: "none" | "imagenet" | path to a state dict.

    Shares the package's loader (`slidetrain.models.encoders.load_resnet`); a
    random init ("none") follows torch's seed so runs with different seeds
    start from different backbones.
    """
    return load_resnet("resnet34", "ResNet34_Weights", weights, seed=torch.initial_seed())


def entries_from_resnet(net: torchvision.models.ResNet) -> nn.ModuleList:
    """The authors' 9-entry cut of `net` (sets conv1.stride = 3; the blocks are shared, not copied)."""
    net.conv1.stride = (STEM_STRIDE, STEM_STRIDE)
    return nn.ModuleList(
        [
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            net.layer1[0],
            net.layer1[1],
            net.layer1[2],
            net.layer2[0:2],
            net.layer2[2:4],
            net.layer3[0:3],
            net.layer3[3:6],
            net.layer4,
        ]
    )


def resnet34_entries(weights: str = "none") -> nn.ModuleList:
    """ResNet34 (`weights`: none | imagenet | state-dict path) as the authors' 9-entry list."""
    return entries_from_resnet(load_resnet34(weights))


def _conv_pool_geometry(stem: nn.Module) -> tuple[nn.Conv2d, nn.MaxPool2d] | None:
    """(conv, pool) of a torchvision stem (conv, bn, relu, maxpool) that `stem_bands` can split, else None."""
    parts = list(stem.children()) if isinstance(stem, nn.Sequential) else []
    if len(parts) != 4:
        return None
    conv, bn, _, pool = parts
    if not (isinstance(conv, nn.Conv2d) and isinstance(pool, nn.MaxPool2d)):
        return None
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training:
        return None  # batch statistics of a band are not those of the image
    if isinstance(conv.padding, str) or conv.dilation != (1, 1) or conv.groups != 1:
        return None
    if conv.padding_mode != "zeros":
        return None
    if pool.ceil_mode or pool.dilation not in (1, (1, 1)) or pool.return_indices:
        return None
    return conv, pool


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def stem_bands(stem: nn.Module, image: Tensor, band_rows: int | None = None) -> Tensor:
    """`stem(image)` for a (conv, bn, relu, maxpool) stem in eval mode, computed in horizontal bands.

    Output rows [j0, j1) need max-pool input rows [j0*s - p, (j1-1)*s - p + k)
    and those need image rows through the conv's window; rows outside the
    maps are the ops' own padding (zeros before the conv, -inf before the
    pool), so every output pixel sees exactly the numbers the whole-image
    call sees. `band_rows` (output rows per band) defaults to 1/16 of the
    output, at least 32; a stem of another shape, or with its BatchNorm in
    training mode (batch statistics), is run whole.
    """
    geometry = _conv_pool_geometry(stem)
    if geometry is None or image.ndim != 4:
        return stem(image)
    conv, pool = geometry
    (kc, _), (sc, scw), (pc, pcw) = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding)
    (km, _), (sm, _), (pm, pmw) = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
    height = image.shape[2]
    conv_h = (height + 2 * pc - kc) // sc + 1
    out_h = (conv_h + 2 * pm - km) // sm + 1
    band_rows = band_rows or max(32, -(-out_h // 16))
    if out_h <= band_rows:
        return stem(image)
    bn_relu = nn.Sequential(*list(stem.children())[1:3])
    out = None
    for j0 in range(0, out_h, band_rows):
        j1 = min(out_h, j0 + band_rows)
        a, b = j0 * sm - pm, (j1 - 1) * sm - pm + km  # pool input rows (conv rows), may overhang
        ca, cb = max(a, 0), min(b, conv_h)
        ia, ib = ca * sc - pc, (cb - 1) * sc - pc + kc  # image rows, may overhang
        band = image[:, :, max(ia, 0) : min(ib, height)]  # (1, 3, rows, W)
        band = F.pad(band, (0, 0, max(-ia, 0), max(ib - height, 0)))  # the conv's zero padding
        y = F.conv2d(band, conv.weight, conv.bias, (sc, scw), (0, pcw))
        y = bn_relu(y)  # (1, 64, cb - ca, W/3)
        y = F.pad(y, (0, 0, ca - a, b - cb), value=float("-inf"))  # the pool's implicit padding
        y = F.max_pool2d(y, pool.kernel_size, pool.stride, (0, pmw))  # (1, 64, j1 - j0, W/6)
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], out_h, y.shape[3]))
        out[:, :, j0:j1] = y
    return out


def check_k(K: int, where: str = "K") -> int:
    if K not in ALLOWED_K:
        raise ConfigError(f"{where}: expected one of {list(ALLOWED_K)} (the authors' cuts), got {K!r}")
    return K


def module_groups(K: int) -> list[list[int]]:
    """Entry indices run by modules 1..K: module k runs (k-1)*g+1 .. k*g with g = 8 // K."""
    check_k(K)
    g = MAX_K // K
    return [list(range((k - 1) * g + 1, k * g + 1)) for k in range(1, K + 1)]


def module_channels(K: int) -> list[tuple[int, int]]:
    """(input channels, output channels) of modules 1..K (module 1's input is the stem's 64)."""
    return [(ENTRY_OUT_CHANNELS[grp[0] - 1], ENTRY_OUT_CHANNELS[grp[-1]]) for grp in module_groups(K)]


def module_strides(K: int) -> list[int]:
    """Spatial downsampling of each module (input size / output size)."""
    out = []
    for grp in module_groups(K):
        s = 1
        for i in grp:
            s *= ENTRY_STRIDES[i]
        out.append(s)
    return out


class LocalBackbone(nn.Module):
    """The 9 entries, every BatchNorm kept in eval mode; the stem frozen unless `train_stem`.

    `K=None` makes one module of entries 1..8 (end-to-end training), or of entries
    0..8 with `train_stem=True` (the stem trained with the rest: the paper's E2E).
    """

    def __init__(
        self,
        entries: nn.ModuleList,
        K: int | None = None,
        train_stem: bool = False,
        checkpointing: str = "none",
        checkpoint_tile_px: int = 64,
    ):
        super().__init__()
        if checkpointing not in CHECKPOINTING:
            raise ConfigError(f"checkpointing: expected one of {list(CHECKPOINTING)}, got {checkpointing!r}")
        self.checkpointing = checkpointing
        self.checkpoint_tile_px = checkpoint_tile_px
        if len(entries) != len(ENTRY_NAMES):
            raise ValueError(f"expected {len(ENTRY_NAMES)} entries, got {len(entries)}")
        if train_stem and K is not None:
            raise ValueError("train_stem: only end-to-end training (K=None) trains the stem")
        self.entries = entries
        self.K = K
        self.train_stem = train_stem
        first = 0 if train_stem else 1  # a trained stem is part of the one end-to-end module
        self.groups = module_groups(K) if K is not None else [list(range(first, len(ENTRY_NAMES)))]
        for p in self.entries[0].parameters():
            p.requires_grad_(train_stem)
        # tiles: one engine per module over its blocks (its input-map tile: checkpoint_tile_px)
        self._engines = (
            [
                StreamingEngine([self.entries[i] for i in grp], checkpoint_tile_px, tile_mode="core")
                for grp in self.groups
            ]
            if checkpointing == "tiles"
            else None
        )

    @property
    def n_modules(self) -> int:
        return len(self.groups)

    def train(self, mode: bool = True) -> LocalBackbone:
        super().train(mode)
        # Batch statistics of one whole slide are neither a batch nor stable:
        # keep the (pre-trained) running statistics, as the authors do.
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def stem(self, image: Tensor) -> Tensor:
        """(1, 3, H, W) -> (1, 64, ~H/6, ~W/6), frozen, without a graph.

        Run in horizontal bands of the output (`stem_bands`): the conv output
        (64 channels at H/3 x W/3, 4x the stem's output) and its BN copy
        then never exist whole. On a whole slide that transient (8x the
        output) was the peak of local learning with K=8.
        """
        with torch.no_grad():
            return stem_bands(self.entries[0], image)

    def prepare(self, image: Tensor) -> Tensor:
        """(1, 3, H, W) image -> the input of module 1: the frozen stem's output, or the image
        itself when the stem is trained. After this call a frozen stem's image is not needed
        again (no gradient reaches it), so a caller that drops it frees its memory."""
        return image if self.train_stem else self.stem(image)

    def run_module(self, k: int, x: Tensor) -> Tensor:
        """Module k (1-based) on its input map; `checkpointing` decides what its graph keeps."""
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            for i in self.groups[k - 1]:
                x = self.entries[i](x)
            return x
        if self.checkpointing == "tiles":
            return self._engines[k - 1](x)  # autograd-aware: the backward streams tile by tile
        for block in self.module_residual_blocks(k):  # blocks: keep only each block's input
            x = checkpoint_fn(block, x, use_reentrant=False)
        return x

    def module_residual_blocks(self, k: int) -> list[nn.Module]:
        """Module k's entries with Sequential entries (layer2[0:2], ...) opened into their blocks."""
        blocks: list[nn.Module] = []
        for entry in self.module_blocks(k):
            residual = isinstance(entry, nn.Sequential) and all(
                isinstance(b, torchvision.models.resnet.BasicBlock | torchvision.models.resnet.Bottleneck)
                for b in entry
            )  # the stem (conv, bn, in-place relu, pool) stays one piece
            blocks.extend(entry if residual else [entry])
        return blocks

    def module_blocks(self, k: int) -> list[nn.Module]:
        return [self.entries[i] for i in self.groups[k - 1]]

    def module_parameters(self, k: int) -> Iterator[nn.Parameter]:
        for block in self.module_blocks(k):
            yield from block.parameters()

    def forward(self, image: Tensor) -> Tensor:
        return self.forward_prepared(self.prepare(image))  # (1, 512, h, w)

    def forward_prepared(self, x: Tensor) -> Tensor:
        """Every module on the output of `prepare`."""
        for k in range(1, self.n_modules + 1):
            x = self.run_module(k, x)
        return x  # (1, 512, h, w)


# --------------------------------------------------------------------------- heads


class GatedAttentionPool(nn.Module):
    """Gated attention (Ilse et al.) over positions; dropout on the softmaxed weights (authors' code)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.2):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.U = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid())
        self.w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:  # h: (N, D)
        scores = self.w(self.V(h) * self.U(h)).squeeze(1)  # (N,)
        weights = self.dropout(torch.softmax(scores, dim=0))  # (N,)
        return weights @ h, weights  # (D,), (N,)


class ConvAttentionHead(nn.Module):
    """The authors' "1c2f" classifier on one feature map.

    Conv2d(C, C, k, stride=k) -> norm -> ReLU -> gated attention over the
    positions -> Linear(C, fc_hidden) -> ReLU -> Linear(fc_hidden, classes).
    """

    def __init__(
        self,
        channels: int,
        n_classes: int,
        kernel: int,
        attn_hidden: int,
        fc_hidden: int,
        norm: str = "group",
        dropout: float = 0.2,
    ):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(channels, channels, kernel, stride=kernel, bias=False)
        if norm == "group":
            self.norm: nn.Module = nn.GroupNorm(channels, channels)
        elif norm == "batch":
            self.norm = nn.BatchNorm2d(channels)
        else:
            raise ConfigError(f"aux_norm: expected 'group' or 'batch', got {norm!r}")
        self.pool = GatedAttentionPool(channels, attn_hidden, dropout)
        self.fc = nn.Sequential(nn.Linear(channels, fc_hidden), nn.ReLU(), nn.Linear(fc_hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:  # x: (1, C, H, W) -> (n_classes,)
        if x.shape[0] != 1:
            raise ValueError(f"one slide at a time: got a batch of {x.shape[0]}")
        pad_h, pad_w = max(self.kernel - x.shape[2], 0), max(self.kernel - x.shape[3], 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zero = no activation after ReLU
        return self.from_conv(self.conv(x))

    def row_bands(self, height: int, n_bands: int) -> list[tuple[int, int]]:
        """Row ranges of the input whose convolutions, stacked, are the whole map's (kernel = stride,
        no padding: output row i reads input rows k*i .. k*i + k-1 alone). [(0, height)] when the map
        is shorter than the kernel (then `forward` pads it)."""
        n_out = height // self.kernel
        if n_out < 1:
            return [(0, height)]
        rows = self.kernel * -(-n_out // min(n_bands, n_out))  # whole output rows per band
        bands = [(r0, r0 + rows) for r0 in range(0, n_out * self.kernel, rows)]
        bands[-1] = (bands[-1][0], height)  # the rows the conv drops stay in the last band
        return bands

    def from_conv(self, y: Tensor) -> Tensor:
        """The head after its convolution: (1, C, h, w) -> (n_classes,)."""
        if y.shape[2] * y.shape[3] > 1:
            y = self.norm(y)
        y = F.relu(y)
        h = y.flatten(2)[0].transpose(0, 1)  # (h*w, C)
        pooled, _ = self.pool(h)  # (C,)
        return self.fc(pooled)  # (n_classes,)


def aux_kernel(channels: int) -> int:
    """Classifier conv kernel (= stride): 9 for 64/128-channel modules, 7 for 256-channel ones."""
    return 9 if channels <= 128 else 7


def aux_classifier(channels: int, n_classes: int, norm: str = "group") -> ConvAttentionHead:
    """Auxiliary classifier of modules 1..K-1 (attention hidden C//2, 128-unit hidden layer)."""
    return ConvAttentionHead(channels, n_classes, aux_kernel(channels), channels // 2, 128, norm)


def final_head(n_classes: int, norm: str = "group", channels: int = 512) -> ConvAttentionHead:
    """Classifier after module K: conv k=5 s=5, attention hidden 128, 512-unit hidden layer."""
    return ConvAttentionHead(channels, n_classes, 5, 128, 512, norm)


# --------------------------------------------------------------------------- RFR


@dataclass(frozen=True)
class RFRSpec:
    in_channels: int  # channels of the module's input (the reconstruction target)
    out_channels: int  # channels of the module's output
    patch_sz: int  # crop side on the module OUTPUT
    upscale: int  # input side / output side (the module's stride)


_R64 = RFRSpec(64, 64, 128, 1)
#: the authors' per-module RFR table (modules 1..K-1)
RFR_TABLE: dict[int, tuple[RFRSpec, ...]] = {
    4: (_R64, RFRSpec(64, 128, 64, 2), RFRSpec(128, 256, 32, 2)),
    8: (
        _R64,
        _R64,
        _R64,
        RFRSpec(64, 128, 64, 2),
        RFRSpec(128, 128, 64, 1),
        RFRSpec(128, 256, 32, 2),
        RFRSpec(256, 256, 32, 1),
    ),
}


def rfr_specs(K: int) -> tuple[RFRSpec, ...]:
    return RFR_TABLE[check_k(K)]


Box = tuple[int, int, int, int]  # (top, left, height, width) in map pixels


def sample_rfr_boxes(
    out_hw: tuple[int, int],
    in_hw: tuple[int, int],
    patch_sz: int,
    upscale: int,
    n_patch: int,
    generator: torch.Generator | None = None,
) -> list[tuple[Box, Box]]:
    """`n_patch` pairs (box on the module output, matching box on its input).

    Output pixel i sits over input pixel upscale*i (receptive-field centres of
    stride-`upscale` convs with "same" padding), so an output box
    (t, l, h, w) matches the input box (t, l, h, w) * upscale. Crops are
    clipped so both boxes lie inside their maps; a map smaller than the patch
    is used whole. Corners are drawn from 0 .. space - 1 (the authors' code).
    """
    (out_h, out_w), (in_h, in_w) = out_hw, in_hw
    ph = min(patch_sz, out_h, in_h // upscale)
    pw = min(patch_sz, out_w, in_w // upscale)
    if ph < 1 or pw < 1:
        raise ValueError(f"RFR: input map {in_hw} too small for upscale {upscale}")
    # corners from 0 .. space - 1 as in the authors' code (space = map - patch: the last row and
    # column of corners are never drawn); a map no larger than the patch has the one corner 0
    space_top = min(out_h - ph, (in_h - ph * upscale) // upscale)
    space_left = min(out_w - pw, (in_w - pw * upscale) // upscale)
    tops = torch.randint(0, max(space_top, 1), (n_patch,), generator=generator).tolist()
    lefts = torch.randint(0, max(space_left, 1), (n_patch,), generator=generator).tolist()
    u = upscale
    return [((t, c, ph, pw), (t * u, c * u, ph * u, pw * u)) for t, c in zip(tops, lefts, strict=True)]


def crop_boxes(x: Tensor, boxes: list[Box]) -> Tensor:
    """(1, C, H, W) and equally sized boxes -> (n, C, h, w)."""
    return torch.cat([x[:, :, t : t + h, c : c + w] for t, c, h, w in boxes], dim=0)


class RFRDecoder(nn.Module):
    """Random feature reconstruction: rebuild random input crops from the matching output crops.

    Decoder Conv3x3(C_out, C_out) -> BN -> ReLU -> Conv3x3(C_out, C_in) after
    a bilinear (align_corners=True) upsampling of the output crops to the
    input crops' size; L1 loss against the detached input.
    """

    def __init__(self, spec: RFRSpec, n_patch: int = 10):
        super().__init__()
        self.spec = spec
        self.n_patch = n_patch
        c_in, c_out = spec.in_channels, spec.out_channels
        self.decoder = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),  # BN's backward needs its input, not its output
            nn.Conv2d(c_out, c_in, 3, padding=1),
        )

    def forward(self, out_map: Tensor, in_map: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # out_map: (1, C_out, h, w) with graph; in_map: (1, C_in, H, W), the module's input
        boxes = self.sample_boxes(out_map, in_map, generator)
        src = crop_boxes(out_map, [b[0] for b in boxes])  # (n, C_out, ph, pw)
        return self.crop_loss(src, crop_boxes(in_map.detach(), [b[1] for b in boxes]))

    def sample_boxes(
        self, out_map: Tensor, in_map: Tensor, generator: torch.Generator | None = None
    ) -> list[tuple[Box, Box]]:
        """The `n_patch` (output box, input box) pairs of one call (what `forward` draws)."""
        return sample_rfr_boxes(
            tuple(out_map.shape[-2:]),
            tuple(in_map.shape[-2:]),
            self.spec.patch_sz,
            self.spec.upscale,
            self.n_patch,
            generator,
        )

    def crop_loss(self, src: Tensor, target: Tensor) -> Tensor:
        """L1 of the decoded output crops (n, C_out, ph, pw) against the input crops (n, C_in, ph*u, pw*u)."""
        if src.shape[-2:] != target.shape[-2:]:  # same size (upscale 1): the identity, no copy
            src = F.interpolate(src, size=target.shape[-2:], mode="bilinear", align_corners=True)
        return F.l1_loss(self.decoder(src), target)


class LocalAux(nn.Module):
    """Auxiliary net G_k of module k < K: classifier A_k and (optionally) RFR decoder U_k."""

    def __init__(
        self,
        spec: RFRSpec,
        n_classes: int,
        rfr: bool = True,
        n_patch: int = 10,
        norm: str = "group",
    ):
        super().__init__()
        self.classifier = aux_classifier(spec.out_channels, n_classes, norm)
        self.rfr = RFRDecoder(spec, n_patch) if rfr else None


class LocalNet(nn.Module):
    """Backbone cut into K modules + auxiliary nets for modules 1..K-1 + final head after module K."""

    def __init__(
        self,
        n_classes: int,
        K: int = 4,
        weights: str = "none",
        rfr: bool = True,
        n_patch: int = 10,
        norm: str = "group",
        entries: nn.ModuleList | None = None,
        checkpointing: str = "none",
        checkpoint_tile_px: int = 64,
    ):
        super().__init__()
        self.backbone = LocalBackbone(
            entries if entries is not None else resnet34_entries(weights),
            K,
            checkpointing=checkpointing,
            checkpoint_tile_px=checkpoint_tile_px,
        )
        self.aux = nn.ModuleList([LocalAux(spec, n_classes, rfr, n_patch, norm) for spec in rfr_specs(K)])
        self.head = final_head(n_classes, norm)

    @property
    def K(self) -> int:
        return self.backbone.n_modules

    def forward(self, image: Tensor) -> Tensor:  # (1, 3, H, W) -> (n_classes,) logits
        return self.head(self.backbone(image))
