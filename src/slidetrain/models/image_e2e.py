"""The whole-image end-to-end baseline of the local-learning paper (Zhang et al., MICCAI 2022).

The same ResNet34 backbone and final head as `models.local.LocalNet`, trained
with ordinary end-to-end backprop: the memory reference of the paper's Table 2
(method key `image_e2e`).
"""

from __future__ import annotations

from torch import Tensor, nn

from slidetrain.models.local import LocalBackbone, final_head, resnet34_entries


class ImageE2ENet(nn.Module):
    """The same backbone (BN in eval) and final head, trained end to end.

    `train_stem=True` (the paper's E2E: the entire network is trained) also trains
    conv1/bn1 and so keeps the stem's activations (64 channels at H/3 x W/3) for
    backward; `train_stem=False` freezes the stem as local learning does, so that
    only the gradient isolation differs between the two.
    """

    def __init__(
        self,
        n_classes: int,
        weights: str = "none",
        norm: str = "group",
        entries: nn.ModuleList | None = None,
        train_stem: bool = True,
        checkpointing: str = "none",
        checkpoint_tile_px: int = 64,
    ):
        super().__init__()
        self.backbone = LocalBackbone(
            entries if entries is not None else resnet34_entries(weights),
            None,
            train_stem,
            checkpointing,
            checkpoint_tile_px,
        )
        self.head = final_head(n_classes, norm)

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.backbone(image))

    def forward_prepared(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.forward_prepared(x))
