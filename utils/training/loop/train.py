"""``train()``: the one call that trains a model, from its settings to a :class:`TrainResult`.

It checks the settings, places and inspects the model once (its objective), builds the batches,
the optimizer and a :class:`~utils.training.loop.trainer.Trainer`, restores a checkpoint into it,
and runs it in this process or under torchrun/``devices=N``.

Example::

    >>> from utils.training import train
    >>> result = train(model, train_ids, val_data=val_ids, precision="auto", max_steps=200,
    ...                batch_size=16, run_dir="runs/demo")          # doctest: +SKIP
    >>> result.final_loss, result.skipped_steps, result.precision.name   # doctest: +SKIP
    (2.31, 0, 'bf16-mixed')
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch
from torch import nn

from utils.models.profile import look_at
from utils.training.amp.acceleration import compile_model, tf32_matmuls
from utils.training.amp.keep_fp32 import KeptModules, plan_keep_fp32
from utils.training.amp.precision import PrecisionPlan, resolve_precision
from utils.training.batches import TensorBatches, as_batches
from utils.training.loop.trainer import Trainer, TrainResult
from utils.training.objectives import objective_for
from utils.training.parallel import distributed
from utils.training.parallel.distributed import World
from utils.training.parallel.launch import train_on
from utils.training.runs.checkpoint import check_resume, check_sharding, load_checkpoint
from utils.training.runs.sharded_checkpoint import load_shards
from utils.training.settings import TrainSettings, settings_with

# train()'s own keyword arguments: what is not a setting (objects, and where and how this call runs)
CALL_ARGUMENTS = ("val_data", "settings", "precision", "device", "optimizer", "loss_fn", "callbacks", "run_dir",
                  "resume_from", "keep_fp32", "scaler_kwargs", "compile", "tf32", "mask_token_id", "devices")


def train(model: nn.Module, train_data, *, val_data=None, settings: TrainSettings | None = None,
          precision=TrainSettings.precision, device=None, optimizer=None, loss_fn=None, callbacks=(),
          run_dir=None, resume_from=None, keep_fp32=None, scaler_kwargs=None, compile=False, tf32=False,
          mask_token_id=None, devices=None, **overrides) -> TrainResult:
    """Train ``model`` with the precision ``resolve_precision(precision, device)`` decides.

    Example::

        >>> result = train(model, ids, precision="16-mixed", device="cpu", max_steps=20)  # doctest: +SKIP
        >>> result.skipped_steps, result.final_loss_scale                                  # doctest: +SKIP
        (0, 65536.0)

    Args:
        model: any ``nn.Module`` returning logits, a tuple (logits first), or a dict/``ModelOutput``
            with ``logits`` (and ``loss``, used as is).
        train_data: a LongTensor (N, T) of token ids (batched and shuffled from ``seed``), a
            DataLoader, or any re-iterable of batches.
        val_data: evaluated at each epoch end (and at the end of a ``max_steps`` run).
        settings: a :class:`~utils.training.settings.TrainSettings` (default None: its defaults);
            its fields (``epochs``, ``max_steps``, ``batch_size``, ``lr``, ``grad_accum_steps``,
            ``checkpoint_every``, ``task``, ``strategy``, ...) are documented there, once.
        **overrides: fields of ``TrainSettings``, applied on top of ``settings``
            (``train(model, ids, max_steps=20)``); any other name is a ``TypeError`` that names it.
        precision: anything :func:`resolve_precision` accepts, or a ``PrecisionPlan``. Default ``"auto"``.
        device: where to train (default None: the best there is, or torchrun's ``cuda:LOCAL_RANK``).
        optimizer: default None: AdamW at ``lr`` with ``weight_decay`` on matrices (:func:`default_optimizer`).
        loss_fn: ``loss_fn(model, batch) -> scalar`` replaces the forward pass and loss.
        callbacks: objects with any of ``on_train_start(trainer)``, ``on_step_end(trainer, metrics)``
            (each logged step), ``on_validation_end(trainer, metrics)``,
            ``on_train_epoch_end(trainer, model)``, ``on_train_end(trainer, result)``.
        run_dir: folder for ``metrics.jsonl`` and ``checkpoints/{latest,best}.pt`` (every epoch end,
            the run end, and as ``checkpoint_every``/``checkpoint_minutes`` say). A folder that already
            holds a run is refused unless ``resume_from`` continues it or ``overwrite=True``.
        resume_from: a checkpoint file or a run folder; continues that run exactly.
        keep_fp32: modules to run in fp32 under autocast: names, glob patterns (``"*.ln_f"``) or
            ``nn.Module`` types, or ``"auto"`` (under ``16-mixed``, those :func:`scan_fp16_overflow`
            flags on the first batch). The plan's ``reason`` names them; the model is left as it
            was when the call returns. See :mod:`utils.training.amp.keep_fp32`.
        scaler_kwargs: GradScaler settings (``init_scale``, ``growth_factor``, ``backoff_factor``,
            ``growth_interval``), see :meth:`PrecisionPlan.make_scaler`.
        compile: ``torch.compile`` the model in place (default False); True, or a dict of
            ``torch.compile`` options such as ``{"backend": "eager"}``. The first step compiles.
            See :func:`~utils.training.amp.acceleration.compile_model`.
        tf32: let fp32 matmuls use TF32 on CUDA GPUs of compute capability >= 8.0 (default False);
            elsewhere it warns and is ignored. The flags are restored when the run ends.
        mask_token_id: the id that hides a token (default: ``config.mask_token_id``, else 255,
            which the byte tokenizer never emits).
        devices: processes to train in (default None: this one, or torchrun's). ``devices=2`` from
            a notebook forks two processes that run this call under DDP (one per GPU; gloo
            processes on a CPU), returns rank 0's result and leaves the trained weights in ``model``.
            See :func:`utils.training.parallel.launch.launch` (CUDA must not be initialised in the kernel yet).

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: bad arguments, empty data, token ids outside the vocabulary or of a non-integer
            dtype, a batch whose targets are all ignored, targets that do not fit the logits, a model
            with nothing to train, a ``run_dir`` that holds another run, or a checkpoint that is
            damaged or does not fit; ``task="causal-lm"`` for a model that sees later tokens;
            unlabelled token ids for a classifier or a model that takes none.
        FloatingPointError: a non-finite loss or gradient with no GradScaler to absorb it (fp32,
            bf16), weights that are not finite at a save, or a 16-mixed run whose steps are all
            skipped until the loss scale is under 2**-24. No checkpoint is written with them.
        CheckpointWriteError: (an ``OSError``) a full disk or read-only folder; the message names
            the file and the cause; the previous checkpoint is intact.

    .. note::
        Metrics are read from the device every ``log_every`` steps only; ``16-mixed`` reads the
        loss scale once per step (one host sync) to count skipped steps. Ctrl-C and SIGTERM (in
        the main thread) stop the run after the optimizer step in flight, with a checkpoint and
        ``interrupted=True``; a second one stops at once, but never during a save.
        ``result.checkpoint_step == result.global_step`` says that nothing was lost. Under
        ``16-mixed`` a :class:`ScaleHealth` watches the scale (one :class:`PrecisionWarning` when it
        collapses; ``scale_health`` in the step metrics and ``TrainResult``).

    .. note::
        Under ``torchrun`` each process runs this call: the model is wrapped in
        ``DistributedDataParallel``, ``batch_size`` is per process (a tensor ``train_data`` is
        sharded so a step's ``batch_size × world_size`` samples are those one process would draw),
        metrics are averaged over ranks, and rank 0 alone logs, runs ``callbacks`` and writes
        ``run_dir``. A checkpoint resumes on any number of processes with the same global batch.
        See :mod:`utils.training.parallel.distributed`.
    """
    call = {k: v for k, v in locals().items() if k not in ("overrides", "devices")}  # for train_on's processes
    settings = settings_with(settings, overrides, call="train", others=CALL_ARGUMENTS)
    settings.check()
    check_fsdp(settings.strategy, model, optimizer, resume_from)
    if devices is not None and not (type(devices) is int and devices == 1):
        return train_on(devices, train, **{**call, "settings": settings})
    world = replace(World.detect(), strategy=settings.strategy)  # torchrun's ranks, or rank 0 of 1
    plan = precision if isinstance(precision, PrecisionPlan) else resolve_precision(precision, world.default_device(device))
    scaler = plan.make_scaler(**(scaler_kwargs or {}))  # bad settings fail before any work
    model = place(model, plan)
    profile = look_at(model, settings.task, call=f"train({type(model).__name__})")  # the one look at the model
    objective = None if loss_fn is not None else objective_for(  # the model's task, probed once, before compiling
        model, settings.task, mask_token_id=mask_token_id, call=profile.caller, profile=profile)
    model = compile_model(model, compile)
    batches = world.shard(as_batches(train_data, settings.batch_size, settings.seed, "train_data"))
    kept, plan = keep_in_fp32(model, keep_fp32, plan, batches, loss_fn)
    val_batches = None if val_data is None else as_batches(val_data, settings.batch_size, settings.seed,
                                                           "val_data", shuffle=False)
    owned = distributed.init_process_group(world, plan.device) if settings.strategy == "fsdp" else False
    try:
        if settings.strategy == "fsdp":  # before the optimizer: sharding replaces the parameters
            distributed.shard_model(model, plan, kept)
        optimizer = optimizer or default_optimizer(model, settings.lr, settings.weight_decay, plan.device_type)
        warm = max(settings.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
        trainer = Trainer(model, plan, optimizer, scheduler, scaler, batches, val_batches, settings, loss_fn,
                          callbacks, run_dir, world, objective, keep_fp32=kept)
        start(trainer, resume_from)
    except BaseException:
        distributed.teardown(owned, plan.device, barrier=False)
        raise
    with tf32_matmuls(plan.device, tf32), KeptModules(model, kept, plan.device_type):  # both undone on the way out
        return world.fit(trainer, owned)


def start(trainer: Trainer, resume_from) -> None:
    """Seed a fresh run, or load ``resume_from`` into ``trainer`` after every compatibility check.

    Raises:
        ValueError: the checkpoint is damaged, or does not fit this model, data position or precision.
    """
    if resume_from is None:
        torch.manual_seed(trainer.settings.seed)
        random.seed(trainer.settings.seed)
        return
    path, state = load_checkpoint(resume_from)
    check_resume(path, state, trainer.settings, world_size=trainer.world.world_size,
                 tensor_data=isinstance(trainer.batches, TensorBatches), plan=trainer.precision)
    if state.get("sharded"):  # the weights and optimizer are in the shard folder, in DCP's layout
        model_state, optim_state = distributed.weights_state(trainer.model, trainer.optimizer, sharded=True)
        state = {**state, **load_shards(path, state, into={"model": model_state, "optimizer": optim_state})}
    try:
        trainer.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"Checkpoint {str(path)!r} {e}") from e
    trainer.checkpoints.resumed_from(path, state["global_step"])


def default_optimizer(model: nn.Module, lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping); fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, fused=device_type == "cuda" or None)


def place(model: nn.Module, plan: PrecisionPlan) -> nn.Module:
    """``model`` on the plan's device, its weights in the plan's dtype.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, or has nothing to train.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is not a torch.nn.Module.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (none with requires_grad=True): nothing to train.")
    model.to(plan.device)
    if plan.param_dtype != torch.float32:  # "-true" precisions hold the weights in half precision
        model.to(plan.param_dtype)
    return model


def keep_in_fp32(model: nn.Module, keep_fp32, plan: PrecisionPlan, batches, loss_fn) -> tuple[list[str], PrecisionPlan]:
    """The modules to run in fp32 (``"auto"``: judged on the first batch) and the plan that names them."""
    if keep_fp32 is None:
        return [], plan

    def first_batch():
        return next(iter(batches.epoch(0) if isinstance(batches, TensorBatches) else batches))
    return plan_keep_fp32(model, keep_fp32, plan, first_batch, loss_fn)


def check_fsdp(strategy: str, model, optimizer, resume_from) -> None:
    """FSDP's own bad input, before any process starts or any file is written."""
    if strategy != "fsdp":
        return
    if resume_from is not None:
        check_sharding(*load_checkpoint(resume_from), strategy)
    if optimizer is not None:
        raise ValueError("train(strategy='fsdp', optimizer=...) is not allowed: sharding replaces the model's "
                         "parameters, so train() builds the optimizer after it. Pass optimizer=None.")
    if isinstance(model, nn.Module):
        distributed.check_strategy(strategy, model)
