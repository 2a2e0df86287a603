"""More than one process: torchrun, DDP and FSDP2 (:mod:`~utils.training.parallel.distributed`), and
starting the workers from a notebook (:mod:`~utils.training.parallel.launch`)."""
