"""Starting a W&B run that a training run never depends on.

Example::

    >>> session = init_wandb("amp-demo", config={"lr": 3e-4}, run_dir="runs/demo")   # doctest: +SKIP
    >>> print(session.message)                                                        # doctest: +SKIP
    W&B: offline (you are not logged in to W&B; ...). The run is saved in runs/demo/wandb/offline-run-...;
    upload it later with `wandb sync runs/demo/wandb/offline-run-...`.
    >>> result = train(model, ids, callbacks=[AmpWandbCallback()], run_dir="runs/demo")  # doctest: +SKIP
    >>> session.finish()                                                              # doctest: +SKIP

wandb is imported here, lazily, and nowhere else: ``utils.training`` imports without it.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
# WANDB_MODE also takes wandb's older spellings.
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}


class WandbWarning(UserWarning):
    """W&B is not used as asked (offline instead of online, not installed), or a W&B call failed mid-run."""


def import_wandb():
    """The ``wandb`` module, or None when it is not installed."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb


@dataclass
class WandbSession:
    """What :func:`init_wandb` started.

    ``mode`` is ``"online"``, ``"offline"`` or ``"disabled"``; ``run`` is the W&B run (None when
    wandb is not installed); ``message`` says which mode and why, where an offline run lives and
    how to upload it; ``offline_dir`` is that folder (``wandb sync`` it).
    """

    mode: str
    run: object | None
    message: str
    offline_dir: Path | None = None

    def finish(self) -> None:
        """Finish the run (flushes it to disk or to the server); a no-op without one."""
        if self.run is not None:
            self.run.finish()


def colab_secret_key() -> bool:
    """On Colab, put the ``WANDB_API_KEY`` secret (Colab's key icon) into the environment, where
    wandb finds it; never prints it. True when a key was taken from there.

    Elsewhere, with a key already in the environment, or with no such secret (or no access to
    it granted), nothing happens.
    """
    if "google.colab" not in sys.modules or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        from google.colab import userdata
    except ImportError:
        return False
    refused = tuple(getattr(userdata, n) for n in ("SecretNotFoundError", "NotebookAccessError", "TimeoutException")
                    if isinstance(getattr(userdata, n, None), type))
    try:
        key = userdata.get("WANDB_API_KEY")
    except refused:  # no such secret, or this notebook was not granted access: stay as we were
        return False
    if not key:
        return False
    os.environ["WANDB_API_KEY"] = key
    return True


def _logged_in(wandb) -> bool:
    """True when wandb has credentials, without prompting for them."""
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # wandb without login(prompt=): look where it looks, never prompt
        try:
            hosts = netrc.netrc().hosts
        except (OSError, netrc.NetrcParseError):
            hosts = {}
        return bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in hosts


def choose_mode(mode: str | None, installed: bool, logged_in) -> tuple[str, str, bool]:
    """Decide ``(mode, why, fallback)``: ``mode=`` first, then ``WANDB_MODE``, then online when
    logged in. ``fallback`` is True when W&B cannot be used as a user would expect (not installed,
    not logged in). ``logged_in`` is a callable, asked only when the answer depends on it.

    Raises:
        ValueError: ``mode`` or ``WANDB_MODE`` is not one wandb knows.
    """
    if not installed:
        return "disabled", "wandb is not installed; `pip install wandb` to log runs to W&B", True
    if mode is not None and mode != "auto":
        if mode not in MODES:
            raise ValueError(f"init_wandb(mode={mode!r}): mode must be None or 'auto' (choose), "
                             f"{', '.join(map(repr, MODES))}.")
        return mode, f"mode={mode!r} was passed", False
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _ENV_MODES:
            raise ValueError(f"WANDB_MODE={env!r} is not a W&B mode. Use one of: {', '.join(_ENV_MODES)}.")
        return _ENV_MODES[env], f"WANDB_MODE={env} is set", False
    if logged_in():
        return "online", "you are logged in to W&B", False
    return "offline", "you are not logged in to W&B; `wandb login` (or wandb.login() in Colab) to go online", True


def _message(mode: str, why: str, run, run_dir) -> tuple[str, Path | None]:
    if mode == "online":
        return f"W&B: online ({why}): {getattr(run, 'url', None) or getattr(run, 'name', '')}", None
    if mode == "offline":
        folder = Path(run.dir).parent  # run.dir is <offline-run-...>/files
        return (f"W&B: offline ({why}). The run is saved in {folder}; upload it later with "
                f"`wandb sync {folder}`."), folder
    where = f" in {Path(run_dir) / 'metrics.jsonl'}" if run_dir is not None else " (the loop's metrics.jsonl)"
    return f"W&B: disabled ({why}). Metrics are kept locally only{where}.", None


def _quiet(wandb) -> dict:
    """wandb's own terminal lines off (its banner, sync hints, "Changes to your wandb environment
    variables will be ignored"): the session's ``message`` says what matters, once."""
    settings = getattr(wandb, "Settings", None)  # a wandb without Settings (very old) keeps its chatter
    return {"settings": settings(silent=True)} if settings is not None else {}


def _start(wandb, chosen: str, why: str, degraded: bool, opts: dict):
    """``wandb.init``: online falls back to offline; any failure of an offline start (an unwritable
    folder, a broken install) disables W&B with the cause named. Returns ``(run, mode, why, degraded)``."""
    run_dir = opts.pop("run_dir")
    kwargs = {**opts, "dir": None if run_dir is None else str(run_dir), **_quiet(wandb)}
    if chosen == "online":
        try:
            return wandb.init(mode="online", **kwargs), chosen, why, degraded
        except Exception as e:  # unreachable, bad key, quota: the run goes on offline
            chosen, why, degraded = "offline", f"W&B could not be reached: {type(e).__name__}: {e}", True
    os.environ["WANDB_MODE"] = chosen  # wandb reads the environment at exit too: no lookup from offline
    try:
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        return wandb.init(mode=chosen, **kwargs), chosen, why, degraded
    except Exception as e:  # training never depends on W&B: any failure here only disables it
        os.environ["WANDB_MODE"] = "disabled"
        return None, "disabled", f"W&B failed to start: {type(e).__name__}: {e}", True


def init_wandb(project: str, config: dict | None = None, mode: str | None = None, run_dir=None) -> WandbSession:
    """Start a W&B run: online when logged in, offline when not (or when W&B is unreachable),
    disabled when wandb is not installed.

    Example::

        >>> session = init_wandb("amp-demo", run_dir="runs/demo")      # doctest: +SKIP
        >>> session.mode, session.offline_dir                          # doctest: +SKIP
        ('offline', PosixPath('runs/demo/wandb/offline-run-20250101_120000-abcd1234'))

    Args:
        project: the W&B project name.
        config: the run's config (hyperparameters); :class:`AmpWandbCallback` adds the precision plan.
        mode: None or ``"auto"`` (default: ``WANDB_MODE`` if set, else online when logged in, else offline),
            ``"online"``, ``"offline"`` or ``"disabled"``.
        run_dir: folder for W&B's files (``<run_dir>/wandb/``); default ``WANDB_DIR`` or the
            working directory. Pass the loop's ``run_dir`` to keep a run's files together.

    Returns:
        A :class:`WandbSession`; its ``message`` (emitted once: a :class:`WandbWarning` when W&B
        is not used as asked, else an INFO log) says which mode, why, and how to ``wandb sync``.

    Raises:
        ValueError: an unknown ``mode`` or ``WANDB_MODE``.

    .. note::
        An online start that fails (no network, bad key, quota) falls back to offline with a
        warning, and an offline start that fails (an unwritable ``wandb/`` folder, a broken
        install: any exception) disables W&B with one warning: a training run never waits on W&B. Tests and unattended runs should set
        ``WANDB_MODE=offline`` in the environment: wandb still tries a lookup at exit otherwise;
        ``init_wandb`` sets it there itself when it starts an offline or disabled run.
    """
    wandb = import_wandb()
    colab_secret_key()  # a Colab user's stored key counts as logged in
    chosen, why, degraded = choose_mode(mode, wandb is not None, lambda: _logged_in(wandb))
    run = None
    if wandb is not None:
        run, chosen, why, degraded = _start(wandb, chosen, why, degraded,
                                            {"project": project, "config": config, "run_dir": run_dir})
    message, folder = _message(chosen, why, run, run_dir)
    if degraded:
        warnings.warn(message, WandbWarning, stacklevel=2)
    else:
        logger.info(message)
    return WandbSession(mode=chosen, run=run, message=message, offline_dir=folder)
