"""The W&B callback that records what AMP did to a run, under our loop or under Lightning.

Example::

    >>> session = init_wandb("amp-demo", run_dir="runs/demo")                       # doctest: +SKIP
    >>> result = train(model, ids, precision="16-mixed", run_dir="runs/demo",
    ...                callbacks=[AmpWandbCallback()])                               # doctest: +SKIP
    >>> session.finish()                                                            # doctest: +SKIP

The two trainers differ in where the plan and the steps come from; a small view per trainer kind
(:class:`_LoopView`, :class:`_LightningView`), chosen once per trainer, holds those differences so
the hooks are written once.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings

from utils.training.amp.precision import ALIASES, FACTS, PrecisionPlan, canonical_precision
from utils.training.wandb_log.session import WandbWarning, import_wandb

STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger steps its charts by this metric


def _lightning_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` classes: those already imported, else pytorch_lightning's if installed."""
    bases = tuple(sys.modules[m].Callback for m in ("pytorch_lightning", "lightning.pytorch")
                  if hasattr(sys.modules.get(m), "Callback"))
    if bases or importlib.util.find_spec("pytorch_lightning") is None:
        return bases
    try:
        import pytorch_lightning
    except ImportError as e:  # a broken install: our loop still gets its callback
        warnings.warn(f"pytorch_lightning is installed but does not import ({e}); AmpWandbCallback works "
                      f"with utils.training.train only.", WandbWarning, stacklevel=4)
        return ()
    return (pytorch_lightning.Callback,)


@functools.cache
def _with_bases(cls: type, bases: tuple[type, ...]) -> type:
    return type(cls.__name__, (cls, *bases), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                              "__doc__": cls.__doc__})


def _dtype(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class _LoopView:
    """Our loop: ``trainer.precision`` is the plan; rows carry the loop's global step as ``step=``."""

    def __init__(self, trainer):
        self.trainer, self.plan = trainer, trainer.precision

    def precision_name(self) -> str:
        return self.plan.name

    def plan_config(self, callback) -> dict:
        plan = self.plan
        return {"precision": plan.name, "dtype": _dtype(plan.autocast_dtype or plan.param_dtype),
                "param_dtype": _dtype(plan.param_dtype), "device": str(plan.device), "reason": plan.reason,
                "loss_scaling": plan.use_scaler,
                **({"keep_fp32": self.trainer.keep_fp32} if getattr(self.trainer, "keep_fp32", None) else {})}

    def define_metrics(self, run) -> None:
        """The loop passes ``step=``: nothing to define."""

    def log(self, callback, row: dict) -> None:
        callback._log(row, step=self.trainer.global_step)

    def validation_row(self, metrics: dict) -> dict:
        return {f"val/{k.removeprefix('val_')}": v for k, v in metrics.items()}

    def summary(self, callback, result) -> dict:
        health = result.scale_health or {}
        return {"amp/precision": result.precision.name, "amp/skipped_steps": result.skipped_steps,
                "amp/final_loss_scale": result.final_loss_scale if callback._tracks_scale(self.trainer) else None,
                "amp/scale_health": health.get("status"), "amp/scale_health_step": health.get("step")}


class _LightningView:
    """Lightning: ``trainer.precision`` is a name; rows carry ``trainer/global_step`` and no ``step=``."""

    def __init__(self, trainer):
        self.trainer, self.raw = trainer, getattr(trainer, "precision", None)

    def precision_name(self) -> str | None:
        return None if self.raw is None else ALIASES.get(str(self.raw).lower())

    def plan_config(self, callback) -> dict:
        name = self.precision_name() or (None if self.raw is None else str(self.raw)) or callback.precision_name
        facts = FACTS.get(name)
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return {"precision": name, "dtype": _dtype(facts and facts.compute_dtype),
                "param_dtype": _dtype(facts.param_dtype if facts else None),
                "device": None if device is None else str(device),
                "reason": f"set by the Lightning Trainer (precision={self.raw!r})" if self.raw is not None
                else "the precision given to AmpWandbCallback",
                "loss_scaling": callback._get_loss_scale(self.trainer) is not None}

    def define_metrics(self, run) -> None:
        run.define_metric(STEP_KEY)
        run.define_metric("amp/*", step_metric=STEP_KEY)

    def log(self, callback, row: dict) -> None:
        callback._log({**row, "epoch": getattr(self.trainer, "current_epoch", None),
                       STEP_KEY: getattr(self.trainer, "global_step", None)})

    def validation_row(self, metrics) -> dict:
        return {}  # Lightning's own logger records its validation metrics

    def summary(self, callback, result) -> dict:
        scale = callback._get_loss_scale(self.trainer) if callback._tracks_scale(self.trainer) else None
        return {"amp/precision": self.precision_name() or callback.precision_name,
                "amp/skipped_steps": callback._skipped, "amp/final_loss_scale": scale}


def _view_for(trainer) -> _LoopView | _LightningView:
    return _LoopView(trainer) if isinstance(getattr(trainer, "precision", None), PrecisionPlan) else _LightningView(trainer)


class AmpWandbCallback:
    """Records in W&B what AMP did to a run: the plan and why, the loss scale, the skipped steps.

    A callback of :func:`utils.training.train` and, when pytorch_lightning is installed, a real
    Lightning ``Callback`` too (``pl.Trainer(callbacks=[AmpWandbCallback()])``). It logs to the
    active ``wandb.run`` (start one with :func:`init_wandb`) and does nothing without one.

    Example::

        >>> session = init_wandb("amp-demo")                                          # doctest: +SKIP
        >>> train(model, ids, precision="16-mixed", callbacks=[AmpWandbCallback()])   # doctest: +SKIP
        >>> pl.Trainer(precision="16-mixed", callbacks=[AmpWandbCallback()]).fit(module)   # doctest: +SKIP

    What it records:

    - run config ``amp``: ``requested``, ``enabled``, ``precision``, ``dtype``, ``param_dtype``,
      ``device``, ``reason``, ``loss_scaling``;
    - each logged step, when a GradScaler is in use: ``amp/loss_scale``, ``amp/skipped_steps``
      (cumulative) and ``amp/overflow`` (1 when a step was skipped since the last logged one);
      with our loop also ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``,
      ``epoch`` and, after evaluation, ``val/loss``, ``val/accuracy``, ``val/perplexity``;
    - each epoch end, through ``wandb.log``: ``amp/enabled``, ``amp/precision`` (as passed, e.g. ``'16'``)
      and ``amp/loss_scale`` (the seed's record);
    - the summary: ``amp/precision``, ``amp/skipped_steps``, ``amp/final_loss_scale``; with our loop
      under ``16-mixed`` also ``amp/scale_health`` (``"ok"`` or ``"warning"``) and, when it warned,
      ``amp/scale_health_step``; each logged step then has ``amp/skip_rate`` (over the health window);
    - ``wandb.alert`` once, when our loop's :class:`ScaleHealth` warns the loss scale is collapsing;
    - the config ``amp.keep_fp32``: the modules ``train(keep_fp32=...)`` ran in fp32, when any.

    W&B steps never go backwards (W&B drops such rows): with our loop the step is the loop's
    global step; under Lightning rows carry ``trainer/global_step``, WandbLogger's step metric,
    and pass no ``step=``. Give each ``train()`` call its own W&B run (or continue with
    ``resume_from``): a second fresh call restarts at step 1, which W&B would drop. If a W&B call
    raises (network, quota), one :class:`WandbWarning` is shown and W&B is left alone for the rest
    of that run; the loop's ``metrics.jsonl`` is complete either way.

    Args:
        enabled: AMP is on for this run (the seed's flag; default True). When False, no loss scale
            is read or logged.
        precision: the precision asked for, in any spelling :func:`resolve_precision` accepts
            (``'16'``, ``'16-mixed'``, ``'16_true'``, ``'bf16'``, ...; default ``"auto"``: the
            trainer's). Kept as given in ``.precision``; its canonical name, ``.precision_name``,
            drives the decisions: a precision that never uses a GradScaler (``32-true``, ``bf16-*``)
            reads no loss scale.
        log_every: Lightning only: log every N optimizer steps (default: the Trainer's
            ``log_every_n_steps``). Our loop calls ``on_step_end`` at its own ``log_every``.

    Raises:
        ValueError: ``precision`` is not an accepted spelling; the message lists those that are.

    .. note::
        Under Lightning the loss scale is read after every optimizer step to count skipped steps:
        one host sync per step on a GPU (our loop does this already for ``16-mixed``).
    """

    def __new__(cls, *args, **kwargs):
        # Subclassing Lightning's Callback at import would cost every `import utils.training` the
        # ~7 s Lightning import; the subclass is made here instead, only where Lightning is installed.
        bases = tuple(b for b in _lightning_bases() if not issubclass(cls, b))
        return super().__new__(_with_bases(cls, bases) if bases else cls)

    def __init__(self, enabled: bool = True, precision="auto", *, log_every: int | None = None):
        self.enabled = enabled
        self.precision = precision
        self.precision_name = canonical_precision(precision)
        self.log_every = log_every
        self._wandb = import_wandb()  # checked once; None when not installed
        self._broken = None  # the run a W&B call failed on: left alone from then on
        self._tracking: bool | None = None
        self._scale: float | None = None
        self._skipped = self._logged_skipped = 0
        self._last_step: int | None = None
        self._alerted = False  # the loss-scale health alert goes out once per run
        self._trainer_view: _LoopView | _LightningView | None = None

    # ---- reading the trainer -----------------------------------------------------------------
    def _get_loss_scale(self, trainer) -> float | None:
        """The GradScaler's current scale (our loop's ``trainer.scaler`` or Lightning's precision
        plugin's); None without a scaler or with a disabled one."""
        scaler = getattr(trainer, "scaler", None)
        if scaler is None:
            plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
            scaler = getattr(plugin, "scaler", None)
        if scaler is None:
            return None
        is_enabled = getattr(scaler, "is_enabled", None)
        if is_enabled is not None and not is_enabled():
            return None
        return float(scaler.get_scale())

    def _view(self, trainer) -> _LoopView | _LightningView:
        """The view of ``trainer``, chosen at ``on_train_start`` (or at the first hook that sees it)."""
        if self._trainer_view is None or self._trainer_view.trainer is not trainer:
            self._trainer_view = _view_for(trainer)
        return self._trainer_view

    def _reads_scale(self, trainer) -> bool:
        """Enabled, and the precision is fp16 (or unknown): bf16 and fp32 never scale the loss."""
        name = self.precision_name if self.precision_name != "auto" else self._view(trainer).precision_name()
        return bool(self.enabled) and (name not in FACTS or FACTS[name].fp16)

    def _tracks_scale(self, trainer) -> bool:
        if self._tracking is None:
            self._tracking = self._reads_scale(trainer) and self._get_loss_scale(trainer) is not None
        return self._tracking

    def _amp_row(self, scale: float | None, skipped: int) -> dict:
        row = {"amp/loss_scale": scale, "amp/skipped_steps": skipped,
               "amp/overflow": int(skipped > self._logged_skipped)}
        self._logged_skipped = skipped
        return row

    # ---- talking to W&B ----------------------------------------------------------------------
    def _run(self):
        run = None if self._wandb is None else getattr(self._wandb, "run", None)
        return None if run is None or run is self._broken else run

    def _call(self, what: str, fn) -> None:
        """``fn(run)`` on the active run; a failure warns once and leaves this run alone after."""
        run = self._run()
        if run is None:
            return
        try:
            fn(run)
        except Exception as e:  # W&B is never worth a training run: network, quota, a wandb bug
            self._broken = run
            warnings.warn(
                f"W&B {what} failed ({type(e).__name__}: {e}). Training goes on; W&B is not called again "
                f"for this run. Every logged step is still in the loop's metrics.jsonl and TrainResult.history.",
                WandbWarning, stacklevel=3,
            )

    def _log(self, row: dict, step: int | None = None) -> None:
        """``wandb.log`` (the module's, which logs to ``wandb.run``), so any stand-in for the module works."""
        row = {k: v for k, v in row.items() if v is not None}
        kwargs = {} if step is None else {"step": step}
        self._call("log", lambda run: self._wandb.log(row, **kwargs))

    # ---- hooks: our loop calls (trainer, ...), Lightning calls (trainer, pl_module, ...) ------
    def on_train_start(self, trainer, pl_module=None) -> None:
        view = self._trainer_view = _view_for(trainer)
        self._tracking, self._alerted = None, False
        self._scale = self._get_loss_scale(trainer) if self._tracks_scale(trainer) else None
        self._skipped = self._logged_skipped = getattr(trainer, "skipped_steps", 0)
        self._last_step = getattr(trainer, "global_step", 0)
        config = {"amp": {"requested": str(self.precision), "enabled": bool(self.enabled),
                          **view.plan_config(self)}}
        self._call("config.update", lambda run: run.config.update(config, allow_val_change=True))
        self._call("define_metric", view.define_metrics)

    def on_step_end(self, trainer, metrics: dict) -> None:
        """Our loop, at each logged step: its metrics, and the AMP state when a scaler is in use."""
        row = {"epoch": metrics.get("epoch"),
               **{f"train/{k}": metrics.get(k) for k in ("loss", "lr", "grad_norm", "tokens_per_s")}}
        if self._tracks_scale(trainer):
            row.update(self._amp_row(metrics.get("loss_scale"), metrics.get("skipped_steps", 0)))
        if "skip_rate" in metrics:  # our loop under 16-mixed: its ScaleHealth's view
            row["amp/skip_rate"] = metrics["skip_rate"]
        self._log(row, step=metrics["step"])
        self._alert_scale_health(trainer)

    def _alert_scale_health(self, trainer) -> None:
        """``wandb.alert`` once, when our loop's :class:`ScaleHealth` has warned."""
        message = getattr(getattr(trainer, "scale_health", None), "message", None)
        if message is None or self._alerted or self._run() is None:
            return
        self._alerted = True
        self._call("alert", lambda run: run.alert(title="fp16 loss scale collapsing", text=message, level="WARN"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Lightning, after each batch: count skipped steps, log every ``log_every`` optimizer steps."""
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step on this batch
            return
        self._last_step = step
        if not self._tracks_scale(trainer):
            return
        scale = self._get_loss_scale(trainer)
        self._skipped += self._scale is not None and scale < self._scale  # GradScaler backs off on inf/NaN
        self._scale = scale
        if step % (self.log_every or getattr(trainer, "log_every_n_steps", 1) or 1) == 0:
            self._log({STEP_KEY: step, "epoch": trainer.current_epoch, **self._amp_row(scale, self._skipped)})

    def on_validation_end(self, trainer, pl_module_or_metrics=None) -> None:
        """Our loop's validation metrics under ``val/``; Lightning's own logger records its own."""
        row = self._view(trainer).validation_row(pl_module_or_metrics)
        if row:
            self._log(row, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module=None) -> None:
        """The seed's epoch record: ``amp/enabled``, ``amp/precision`` (as passed; the trainer's when
        ``"auto"``) and, when a GradScaler is in use, ``amp/loss_scale``."""
        precision = self.precision if self.precision_name != "auto" else self._view(trainer).precision_name()
        row = {"amp/enabled": int(bool(self.enabled)), "amp/precision": None if precision is None else str(precision),
               "amp/loss_scale": self._get_loss_scale(trainer) if self._reads_scale(trainer) else None}
        self._view(trainer).log(self, row)

    def on_train_end(self, trainer, pl_module_or_result=None) -> None:
        """The summary: the precision, the total skipped steps and the final loss scale."""
        self._alert_scale_health(trainer)  # a warning after the last logged step
        summary = self._view(trainer).summary(self, pl_module_or_result)
        summary = {k: v for k, v in summary.items() if v is not None}
        self._call("summary.update", lambda run: run.summary.update(summary))
