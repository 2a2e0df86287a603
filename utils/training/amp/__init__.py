"""Precision: what runs in which dtype, and what it costs.

- :mod:`~utils.training.amp.precision`: ``resolve_precision`` and every precision fact;
- :mod:`~utils.training.amp.scale_health`: the loss scale's health during a run;
- :mod:`~utils.training.amp.keep_fp32`: modules kept in fp32 under fp16;
- :mod:`~utils.training.amp.overflow_scan`: fp16's range before training;
- :mod:`~utils.training.amp.precision_report`: ``compare_precisions``, the AMP doctor;
- :mod:`~utils.training.amp.acceleration`: ``torch.compile``, TF32 and the CPU allocator;
- :mod:`~utils.training.amp.measure`: step clocks, saved-activation bytes, matmul ceilings, FLOPs.
"""
