"""The training loop: ``train()``, the :class:`~utils.training.loop.trainer.Trainer`, its on-device
step checks (:mod:`~utils.training.loop.guards`) and its stop signals
(:mod:`~utils.training.loop.interrupts`)."""
