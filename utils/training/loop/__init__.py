"""The training loop: ``train()`` (:mod:`~utils.training.loop.train`), the
:class:`~utils.training.loop.trainer.Trainer` and the state it owns (:mod:`~utils.training.loop.position`,
:mod:`~utils.training.loop.meter`), ``evaluate`` (:mod:`~utils.training.loop.evaluate`), its on-device
step checks (:mod:`~utils.training.loop.guards`) and its stop signals (:mod:`~utils.training.loop.interrupts`)."""
