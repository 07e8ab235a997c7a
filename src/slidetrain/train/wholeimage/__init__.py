"""Whole-image learning: one whole slide image (3, H, W) per training step.

| module | holds |
|---|---|
| `loop` | `fit_whole_image` / `evaluate_whole_image`: the train-image / evaluate-image CLI's training and test loop |
| `registry` | method name -> learner: `build_learner`, `learner_config`, `register_learner`, `whole_image_methods` |
| `interface` | `WholeImageLearner`, what the loop needs from a learner; pending-gradient state helpers |
| `resnet_learner` | `ResNetLearner`: optimiser, schedule, OOM policy, checkpoints of the ResNet34 learners |
| `local_learner` | `LocalLearner` (local_k4/k8[_norfr]): locally supervised learning |
| `image_e2e_learner` | `ImageE2ELearner` (image_e2e): the same network trained end to end |
| `augment` | the authors' slide augmentation, normalisation, per-channel training statistics |
| `batchnorm` | BatchNorm statistics calibrated once on the training slides (`calibrate_bn`) |
| `oom` | out-of-memory recognition and the edge crop of a retry (`on_oom`) |

The networks are in `slidetrain.models.local` and `slidetrain.models.image_e2e`; StreamingCNN's learner in
`slidetrain.models.streamingcnn` registers itself. A learner's use::

    learner = build_learner("local_k4", n_classes=2, params={"epochs": 55}, device=device)
    learner.calibrate_batchnorm(normalise(image) for image in train_slides)  # calibrate_bn only
    for epoch in range(cfg.epochs):
        for i, (image, label) in enumerate(train_slides, 1):
            losses = learner.train_slide(normalise(augment_slide(image, rng)), label)
            if i % cfg.accumulation == 0:
                learner.step()
        learner.end_epoch(epoch, val_loss)
    probs = learner.predict(normalise(image))          # (C,)

`step` runs every `accumulation` slides of an epoch (as the authors' code: no
extra step at the end of an epoch; the gradients of an epoch's last
n_train % accumulation slides join the next epoch's first step).
"""
