"""MIL-RNN (Campanella et al. 2019): top-1 MIL tile classifier, then an RNN over the top-ranked tiles.

Reference (MSKCC-Computational-Pathology/MIL-nature-medicine-2019, MIL_train.py
+ RNN_train.py), on frozen tile features:
- Stage 1 (epochs < `stage1_epochs`; 0 = half of the run): a tile classifier
  is trained by top-1 MIL: in each bag the tile with the highest
  positive-class probability takes the slide label, CE. The reference
  fine-tunes a whole ResNet34 whose last layer is Linear(512, 2); on frozen
  features the trainable part is that layer, Linear(in, 2) (`tile_hidden: 0`,
  default), or with `tile_hidden: H` a Linear(in, H)-ReLU embedding before it.
- Stage 2: the stage-1 model is frozen (no gradient) and ranks the tiles; an
  Elman RNN reads the top s=10 tiles in decreasing probability order (all
  tiles if the bag has fewer): x_t = Linear(F, 128)(f_t),
  state = ReLU(x_t + Linear(128, 128)(state)), output Linear(128, 2) of the
  last state. F is the tile classifier's input (the frozen features, or its
  hidden embedding), as the reference's RNN reads the MIL-trained ResNet's
  512-d features.
- Predictions: stage 1, softmax of the top tile's logits (max-tile
  probability); stage 2, softmax of the RNN output. The stage is a buffer, so
  a checkpoint restores it.
Binary tasks only. Per-tile heatmap scores are the positive-class
probabilities in `extras["tile_scores"]`; they are not a softmax over tiles,
so `has_attention` is False.

Training as the reference: the MIL stage picks each training slide's top
tile once per epoch, with the model in eval mode (`epoch_bags`), and trains
on those tiles (Adam lr 1e-4, weight decay 1e-4); the RNN stage uses its own
optimiser (`group_configs`): SGD lr 0.1 (`rnn_lr`), Nesterov momentum 0.9,
weight decay 1e-4 (`rnn_weight_decay`), in batches of 128 slides
(`rnn_batch`: gradients averaged over the batch, one step per batch), and
the model is selected on validation balanced accuracy
(`selection_metric: val_balanced_accuracy`). Known differences: the
reference trains the MIL stage on batches of 512 top tiles and validates it
every 10 epochs on balanced error; here one slide's top tile per step
(`accumulation` slides per step) and the MIL stage is never selected (the
RNN is the result). `param_groups` keeps one optimiser per stage so their
states do not mix.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from slidetrain.configs.mil import MILRNNConfig, TrainConfig
from slidetrain.models import register
from slidetrain.models.base import MILModel, MILOutput


@register("milrnn", MILRNNConfig, binary_only=True)
class MILRNN(MILModel):
    has_attention = False

    def __init__(self, in_dim: int, n_classes: int, cfg: MILRNNConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.tile_hidden:
            self.tile_embed = nn.Sequential(nn.Linear(in_dim, cfg.tile_hidden), nn.ReLU())
            feat = cfg.tile_hidden
        else:
            self.tile_embed = nn.Identity()
            feat = in_dim
        self.tile_classifier = nn.Linear(feat, n_classes)
        self.rnn_in = nn.Linear(feat, cfg.rnn_dim)
        self.rnn_state = nn.Linear(cfg.rnn_dim, cfg.rnn_dim)
        self.rnn_out = nn.Linear(cfg.rnn_dim, n_classes)
        self.register_buffer("stage", torch.tensor(1))

    def stage1_parameters(self) -> list[nn.Parameter]:
        return [*self.tile_embed.parameters(), *self.tile_classifier.parameters()]

    def param_groups(self) -> list[list[nn.Parameter]]:
        stage1 = self.stage1_parameters()
        ids = {id(p) for p in stage1}
        return [stage1, [p for p in self.parameters() if id(p) not in ids]]

    def group_configs(self, cfg: MILRNNConfig) -> list[TrainConfig]:
        rnn = replace(
            cfg,
            optimizer="sgd",
            lr=cfg.rnn_lr,
            momentum=cfg.rnn_momentum,
            nesterov=True,
            weight_decay=cfg.rnn_weight_decay,
        )
        return [cfg, rnn]

    def accumulation(self, default: int) -> int:
        return default if int(self.stage) == 1 else self.cfg.rnn_batch

    def epoch_bags(self, bags: list[Tensor]) -> list[Tensor]:
        """Stage 1: each bag's top tile (1, D) by the current model in eval mode; stage 2: the bags."""
        if int(self.stage) != 1:
            return bags
        was_training = self.training
        self.eval()
        with torch.no_grad():
            tops = [int(self._tiles(bag)[2].argmax()) for bag in bags]
        self.train(was_training)
        return [bag[top : top + 1] for bag, top in zip(bags, tops, strict=True)]

    def on_epoch_start(self, epoch: int, n_epochs: int) -> None:
        first = self.cfg.stage1_epochs or max(1, n_epochs // 2)
        self.stage.fill_(1 if epoch < first else 2)

    def selectable(self) -> bool:
        # The reference selects the RNN on validation; a stage-1 (max-tile) model is never the result.
        return int(self.stage) == 2

    def _tiles(self, bag: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.tile_embed(bag)  # (N, F)
        logits = self.tile_classifier(feats)  # (N, 2)
        return feats, logits, torch.softmax(logits, dim=1)[:, 1]  # (N,) positive probability

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        if int(self.stage) == 1:
            _, tile_logits, p = self._tiles(bag)
            top = p.argmax()
            return MILOutput(logits=tile_logits[top], extras={"tile_scores": p.detach()})
        with torch.no_grad():  # stage 2: the tile model is frozen
            feats, _, p = self._tiles(bag)
        s = min(self.cfg.top_s, bag.shape[0])
        order = torch.topk(p, s).indices  # (s,) decreasing probability
        if self.cfg.shuffle and self.training:
            order = order[torch.randperm(s, device=order.device)]
        inputs = self.rnn_in(feats[order])  # (s, R)
        state = inputs.new_zeros(self.cfg.rnn_dim)  # (R,)
        for x in inputs:
            state = torch.relu(x + self.rnn_state(state))
        return MILOutput(logits=self.rnn_out(state), extras={"tile_scores": p})
