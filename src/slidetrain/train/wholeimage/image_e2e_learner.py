"""The whole-image end-to-end baseline (`image_e2e`) of the local-learning paper.

The same ResNet34 backbone (BN in eval) and final head as the local learners,
trained with end-to-end backprop: the memory reference of the paper's Table 2.
"""

from __future__ import annotations

from torch import Tensor

from slidetrain.configs.image import ImageE2EConfig
from slidetrain.models.image_e2e import ImageE2ENet
from slidetrain.train.wholeimage.resnet_learner import ResNetLearner


class ImageE2ELearner(ResNetLearner):
    """The same backbone (BN in eval) and final head, trained by end-to-end backprop."""

    cfg: ImageE2EConfig
    net: ImageE2ENet

    def _build_net(self) -> ImageE2ENet:
        c = self.cfg
        return ImageE2ENet(
            self.n_classes,
            c.weights,
            c.head_norm,
            train_stem=c.stem == "trained",
            checkpointing=c.checkpointing,
            checkpoint_tile_px=c.checkpoint_tile_px,
        )

    def _forward_backward(self, prepared: list[Tensor], label: Tensor) -> dict[str, float]:
        loss = self._ce(self.net.forward_prepared(prepared.pop()), label)
        self._backward(loss)
        return {"final_ce": loss.item(), "loss": loss.item()}
