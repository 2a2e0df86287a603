"""AMP helpers: the seed's precision toggle, and the W&B callback that records what AMP did to a run.

Example::

    >>> session = init_wandb("amp-demo", run_dir="runs/demo")                       # doctest: +SKIP
    >>> result = train(model, ids, precision="16-mixed", run_dir="runs/demo",
    ...                callbacks=[AmpWandbCallback()])                               # doctest: +SKIP
    >>> session.finish()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings

from utils.training.loop import Trainer as LoopTrainer
from utils.training.loop import TrainResult
from utils.training.precision import ALIASES, PrecisionPlan, canonical_precision
from utils.training.wandb_setup import WandbWarning, import_wandb

STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger steps its charts by this metric
_NO_SCALER = ("32-true", "bf16-mixed", "bf16-true")  # precisions that never use a GradScaler
_DTYPES = {"64": "float64", "32": "float32", "16": "float16", "bf16": "bfloat16"}


def compute_effective_precision(requested_precision, use_amp, cuda_available, use_gpu) -> str:
    """Map the seed's boolean AMP toggle to a legacy precision string.

    This is the boolean-toggle mapping of the seed project, kept exactly:

    - ``use_amp is None``: the toggle is unset, so ``requested_precision`` is returned unchanged;
    - ``use_amp`` true, CUDA available and ``use_gpu`` true: ``"16"`` (fp16 mixed);
    - anything else: ``"32"``.

    Example::

        >>> compute_effective_precision("bf16", use_amp=None, cuda_available=False, use_gpu=False)
        'bf16'
        >>> compute_effective_precision("32", use_amp=True, cuda_available=True, use_gpu=True)
        '16'

    .. note::
        New code should call :func:`utils.training.resolve_precision`, which also knows bf16, CPU
        autocast and why it chose what it chose. The string returned here is one it accepts
        (``"16"`` means ``"16-mixed"``, ``"32"`` means ``"32-true"``).
    """
    if use_amp is None:
        return requested_precision
    if use_amp and cuda_available and use_gpu:
        return "16"
    return "32"


# ----------------------------------------------------------------------------------------------
# The W&B callback


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


def _is_loop(trainer) -> bool:
    return isinstance(trainer, LoopTrainer)


def _dtype_name(name: str | None) -> str | None:
    return _DTYPES.get(str(name).partition("-")[0])


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
    - each epoch end: ``amp/enabled`` and ``amp/loss_scale`` (the seed's record);
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

    def _trainer_precision(self, trainer) -> str | None:
        """The trainer's canonical precision: our plan's name, Lightning's ``trainer.precision``."""
        precision = getattr(trainer, "precision", None)
        if isinstance(precision, PrecisionPlan):
            return precision.name
        return ALIASES.get(str(precision).lower()) if precision is not None else None

    def _reads_scale(self, trainer) -> bool:
        name = self.precision_name if self.precision_name != "auto" else self._trainer_precision(trainer)
        return bool(self.enabled) and name not in _NO_SCALER

    def _tracks_scale(self, trainer) -> bool:
        if self._tracking is None:
            self._tracking = self._reads_scale(trainer) and self._get_loss_scale(trainer) is not None
        return self._tracking

    def _plan_config(self, trainer) -> dict:
        config = {"requested": str(self.precision), "enabled": bool(self.enabled)}
        plan = getattr(trainer, "precision", None)
        if isinstance(plan, PrecisionPlan):
            dtype = plan.autocast_dtype or plan.param_dtype
            kept = getattr(trainer, "keep_fp32", None)
            return {**config, "precision": plan.name, "dtype": str(dtype).removeprefix("torch."),
                    "param_dtype": str(plan.param_dtype).removeprefix("torch."), "device": str(plan.device),
                    "reason": plan.reason, "loss_scaling": plan.use_scaler, **({"keep_fp32": kept} if kept else {})}
        name = self._trainer_precision(trainer) or (None if plan is None else str(plan)) or self.precision_name
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return {**config, "precision": name, "dtype": _dtype_name(name),
                "param_dtype": _dtype_name(name) if str(name).endswith("-true") else "float32",
                "device": None if device is None else str(device),
                "reason": f"set by the Lightning Trainer (precision={plan!r})" if plan is not None
                else "the precision given to AmpWandbCallback", "loss_scaling": self._get_loss_scale(trainer) is not None}

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
        row = {k: v for k, v in row.items() if v is not None}
        if step is None:
            self._call("log", lambda run: run.log(row))
        else:
            self._call("log", lambda run: run.log(row, step=step))

    # ---- hooks: our loop calls (trainer, ...), Lightning calls (trainer, pl_module, ...) ------
    def on_train_start(self, trainer, pl_module=None) -> None:
        self._tracking, self._alerted = None, False
        self._tracks_scale(trainer)
        self._scale = self._get_loss_scale(trainer) if self._tracking else None
        self._skipped = self._logged_skipped = getattr(trainer, "skipped_steps", 0)
        self._last_step = getattr(trainer, "global_step", 0)
        config = {"amp": self._plan_config(trainer)}
        self._call("config.update", lambda run: run.config.update(config, allow_val_change=True))
        if not _is_loop(trainer):
            self._call("define_metric", lambda run: (run.define_metric(STEP_KEY),
                                                     run.define_metric("amp/*", step_metric=STEP_KEY)))

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
        if _is_loop(trainer):
            row = {f"val/{k.removeprefix('val_')}": v for k, v in pl_module_or_metrics.items()}
            self._log(row, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module=None) -> None:
        """The seed's epoch record: ``amp/enabled`` and, when there is one, ``amp/loss_scale``."""
        row = {"amp/enabled": int(bool(self.enabled)),
               "amp/loss_scale": self._get_loss_scale(trainer) if self._reads_scale(trainer) else None}
        step = getattr(trainer, "global_step", None)
        if _is_loop(trainer):
            self._log(row, step=step)
        else:
            self._log({**row, "epoch": getattr(trainer, "current_epoch", None), STEP_KEY: step})

    def on_train_end(self, trainer, pl_module_or_result=None) -> None:
        """The summary: the precision, the total skipped steps and the final loss scale."""
        result = pl_module_or_result
        if isinstance(result, TrainResult):
            self._alert_scale_health(trainer)  # a warning after the last logged step
            health = result.scale_health or {}
            summary = {"amp/precision": result.precision.name, "amp/skipped_steps": result.skipped_steps,
                       "amp/final_loss_scale": result.final_loss_scale if self._tracks_scale(trainer) else None,
                       "amp/scale_health": health.get("status"), "amp/scale_health_step": health.get("step")}
        else:
            summary = {"amp/precision": self._trainer_precision(trainer) or self.precision_name,
                       "amp/skipped_steps": self._skipped,
                       "amp/final_loss_scale": self._get_loss_scale(trainer) if self._tracks_scale(trainer) else None}
        summary = {k: v for k, v in summary.items() if v is not None}
        self._call("summary.update", lambda run: run.summary.update(summary))
