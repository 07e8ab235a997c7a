"""The ResNet34 whole-image learners: locally supervised learning (Zhang et al., MICCAI 2022) (the LocalLearner).

Methods (registered in `registry`): local_k4, local_k8 (RFR on), local_k4_norfr,
local_k8_norfr (the RFR ablation); the end-to-end baseline on the same network
(`image_e2e`) is in `image_e2e_learner`.

Where the authors' paper and code differ (defaults = code):

| key | code (default) | paper |
|---|---|---|
| schedule | "simultaneous": per slide, module k forward, local backward, detached to k+1 | "sequential" |
| lr_backbone / lr_heads | 1e-5 (2e-5 * 0.5) / 2e-5 | 1e-5 / 2e-5 |
| weight_decay | 1e-2 | 1e-6 |
| epochs / scheduler | 55, x0.1 at epochs 25, 35, 45 (the README's training command) | "plateau", factor 0.1 |
| classifier norm | GroupNorm(C, C) ("group") | "norm": "batch" is an option |

The code's options defaults (80 epochs, x0.1 at 40 and 60) are the other
published schedule: `epochs: 80, step_milestones: [40, 60]`. (The authors'
first commit had StepLR(60), i.e. a constant rate over 55 epochs.)

Out-of-memory: see `oom`. Gradients of a failed attempt are discarded, so a
retry never double-counts a module.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from slidetrain.configs.image import LocalConfig
from slidetrain.errors import ConfigError
from slidetrain.models.local import LocalNet, crop_boxes
from slidetrain.train.wholeimage.resnet_learner import ResNetLearner


class LocalLearner(ResNetLearner):
    """ResNet34 in K gradient-isolated modules, each trained by its own loss.

    Module k < K: alpha * RFR + aux CE; module K: CE of the final head. The
    stem is frozen; backbone BatchNorms stay in eval mode.

    schedule="simultaneous" (authors' code): per slide every module is trained;
    module k's output is detached before module k+1 sees it, so no gradient
    crosses a module boundary and only one module's graph is alive at a time.
    schedule="sequential" (paper): module 1 (with G1) for epochs_per_module
    epochs, then it is frozen (eval, requires_grad False, run under no_grad)
    and module 2 trains, ...; module K and the head train for the rest.
    One optimiser and one LR schedule span all stages.
    """

    cfg: LocalConfig
    net: LocalNet

    def __init__(self, n_classes: int, cfg: LocalConfig, device: torch.device | str = "cpu"):
        if not isinstance(cfg, LocalConfig):
            raise TypeError(f"LocalLearner needs a LocalConfig, got {type(cfg).__name__}")
        super().__init__(n_classes, cfg, device)
        self.sequential = cfg.schedule == "sequential"
        self.active = 1 if self.sequential else cfg.K  # module being trained (sequential)

    def _build_net(self) -> LocalNet:
        c = self.cfg
        return LocalNet(
            self.n_classes,
            c.K,
            c.weights,
            c.rfr,
            c.n_patch,
            c.head_norm,
            checkpointing=c.checkpointing,
            checkpoint_tile_px=c.checkpoint_tile_px,
        )

    def frozen_modules(self) -> list[int]:
        return list(range(1, self.active)) if self.sequential else []

    def _module_nets(self, k: int) -> list[nn.Module]:
        nets = self.net.backbone.module_blocks(k)
        return nets + ([self.net.aux[k - 1]] if k < self.cfg.K else [self.net.head])

    def _apply_freeze(self) -> None:
        for k in self.frozen_modules():
            for m in self._module_nets(k):
                for p in m.parameters():
                    p.requires_grad_(False)
                    p.grad = None

    def _set_train_mode(self) -> None:
        self.net.train()
        for k in self.frozen_modules():
            for m in self._module_nets(k):
                m.eval()

    def _forward_backward(self, prepared: list[Tensor], label: Tensor) -> dict[str, float]:
        K, backbone = self.cfg.K, self.net.backbone
        losses: dict[str, float] = {}
        total = 0.0
        x = prepared.pop()  # (1, 64, H/6, W/6): the frozen stem's output, no graph
        last = self.active if self.sequential else K
        for k in range(1, last + 1):
            if k < last and self.sequential:  # frozen
                with torch.no_grad():
                    x = backbone.run_module(k, x)
                continue
            out = backbone.run_module(k, x)  # (1, C_k, h, w); x carries no graph
            # tiles: one streaming backward node holds the output's gradient throughout anyway, so
            # building it in one map is pure gain; under `blocks` autograd frees it after the last
            # block's backward while our map would live through the whole module's (measured: +1 map)
            if k < K and backbone.checkpointing == "tiles":
                losses.update(self._aux_backward_assembled(k, x, out, label))
                total += losses[f"m{k}_ce"] + self.cfg.alpha * losses.get(f"m{k}_rfr", 0.0)
                x = out.detach()
                del out
                continue
            if k < K:
                aux = self.net.aux[k - 1]
                ce = self._ce(aux.classifier(out), label)
                loss = ce
                losses[f"m{k}_ce"] = ce.item()
                if aux.rfr is not None:
                    rec = aux.rfr(out, x, self.generator)
                    loss = loss + self.cfg.alpha * rec
                    losses[f"m{k}_rfr"] = rec.item()
            else:
                loss = self._ce(self.net.head(out), label)
                losses["final_ce"] = loss.item()
            self._backward(loss)
            total += loss.item()
            x = out.detach()  # the gradient boundary between module k and k+1
            del out, loss
        losses["loss"] = total
        return losses

    #: row bands of the auxiliary classifier's convolution in `_aux_backward_assembled`
    ASSEMBLED_BANDS = 16

    def _aux_backward_assembled(self, k: int, x: Tensor, out: Tensor, label: Tensor) -> dict[str, float]:
        """Module k's auxiliary losses and backward with the output's gradient built in ONE map.

        Through autograd, the classifier's gradient (a full map, plus its convolution's working
        maps) and each RFR crop's (a full map of zeros around the crop, from the slice's backward)
        meet in an accumulation buffer while the heads' graphs are alive: several maps at once, the
        peak of a checkpointed module. Here the heads run on detached leaves, one after the other:
        RFR on the crops (their gradients are crop-sized), then the classifier's convolution on row
        bands of the output whose `.grad` are views of one zero map (autograd adds into an existing
        `.grad` in place), the crops' gradients are added at their boxes, and that map is the
        module's backward. The same sums as autograd's in another order (float rounding only), the
        same draws of boxes and dropout masks (RFR draws from `self.generator`, dropout from torch's).
        """
        aux, losses = self.net.aux[k - 1], {}
        crops, boxes = None, []
        if aux.rfr is not None:
            boxes = aux.rfr.sample_boxes(out, x, self.generator)
            crops = crop_boxes(out.detach(), [b[0] for b in boxes])  # (n, C_out, ph, pw), a leaf
            target = crop_boxes(x, [b[1] for b in boxes])
            rec = aux.rfr.crop_loss(crops.requires_grad_(True), target)
            losses[f"m{k}_rfr"] = rec.item()
            self._backward(self.cfg.alpha * rec)  # the decoder's gradients and crops.grad
            del rec, target
        head, height = aux.classifier, out.shape[2]
        # the classifier's conv (kernel = stride) on row bands: its backward's working maps (~2 maps
        # for the whole map on oneDNN) then exist for one band at a time
        bands = head.row_bands(height, self.ASSEMBLED_BANDS) if out.shape[3] >= head.kernel else [(0, height)]
        grad = torch.zeros_like(out)
        leaves = [out.detach()[:, :, r0:r1].requires_grad_(True) for r0, r1 in bands]
        for (r0, r1), band in zip(bands, leaves, strict=True):
            band.grad = grad[:, :, r0:r1]
        if len(leaves) == 1:
            logits = head(leaves[0])
        else:
            logits = head.from_conv(torch.cat([head.conv(band) for band in leaves], dim=2))
        ce = self._ce(logits, label)
        losses[f"m{k}_ce"] = ce.item()
        with warnings.catch_warnings():  # a band view's strides are the map's: fine for an in-place add
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout")
            self._backward(ce)  # the classifier's gradients, the bands' into `grad`
        if any(
            band.grad is None or band.grad.data_ptr() != grad[:, :, r0:r1].data_ptr()
            for (r0, r1), band in zip(bands, leaves, strict=True)
        ):  # autograd replaced a view
            raise RuntimeError("aux backward: a band's gradient left the shared map")
        del leaves, logits, ce
        if crops is not None and crops.grad is not None:
            for i, ((t, c, h, w), _) in enumerate(boxes):
                grad[:, :, t : t + h, c : c + w] += crops.grad[i : i + 1]
        del crops
        out.backward(grad)  # already scaled by 1 / accumulation, as _backward scales the losses
        return losses

    def end_epoch(self, epoch: int, val_loss: float | None) -> None:
        super().end_epoch(epoch, val_loss)
        if self.sequential:
            stage = min(self.cfg.K, (epoch + 1) // self.cfg.epochs_per_module + 1)
            if stage > self.active:
                self.active = stage
                self._apply_freeze()

    def _extra_state(self) -> dict:
        return {"K": self.cfg.K, "schedule": self.cfg.schedule, "active_module": self.active}

    def _load_extra_state(self, state: dict) -> None:
        if state.get("K") != self.cfg.K or state.get("schedule") != self.cfg.schedule:
            raise ConfigError(
                f"checkpoint: K={state.get('K')} schedule={state.get('schedule')!r}, "
                f"but this run has K={self.cfg.K} schedule={self.cfg.schedule!r}"
            )
        self.active = int(state["active_module"])
        self._apply_freeze()
