"""Loss and loss-scale curves of a run, from a ``TrainResult`` or a run folder's ``metrics.jsonl``.

Example::

    >>> fig = plot_training_curves(result)            # or plot_training_curves("runs/demo")  # doctest: +SKIP
    >>> fig.savefig("curves.png")                                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """The step and epoch records of a run folder's ``metrics.jsonl``.

    A torn last line (a run killed mid-write) is skipped with a ``RuntimeWarning`` naming the file.

    Raises:
        FileNotFoundError: the folder has no ``metrics.jsonl``.
        ValueError: a line before the last is not JSON (the message names the file and line).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} has no metrics.jsonl: was it passed to train(run_dir=...)?")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # after the last newline: empty unless a write was cut short
    if torn.strip() and _is_json(torn):  # a whole record, only its newline missing (written by hand)
        lines.append(torn)
        torn = ""
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not a JSON record ({e}): {line[:80]!r}") from e
    if torn.strip():
        warnings.warn(f"{path}: its last line is incomplete (a run stopped mid-write) and was skipped; "
                      f"resuming the run repairs the file.", RuntimeWarning, stacklevel=2)
    return [r for r in records if r.get("type") == "step"], [r for r in records if r.get("type") == "epoch"]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def plot_training_curves(source, title: str | None = None):
    """Train loss (and val loss per epoch) beside the loss scale with skipped steps marked.

    Args:
        source: a ``TrainResult`` or a run folder.
        title: the figure's title (default: the precision used).

    Returns:
        A matplotlib Figure (not shown).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if hasattr(source, "history"):
        steps, epochs, precision = source.history, source.epochs, source.precision.name
    else:
        steps, epochs = read_metrics(source)
        precision = None
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    loss_ax, scale_ax = fig.subplots(1, 2)
    x = [r["step"] for r in steps]
    loss_ax.plot(x, [r["loss"] for r in steps], label="train loss", color="tab:blue")
    val = [(e["step"], e["val_loss"]) for e in epochs if e.get("val_loss") is not None]
    if val:
        loss_ax.plot(*zip(*val), "o--", label="val loss", color="tab:orange")
    loss_ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (nats/token)", title="Loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    for ax in (loss_ax, scale_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole numbers
    scales = [(r["step"], r["loss_scale"]) for r in steps if r.get("loss_scale") is not None]
    if scales:
        scale_ax.plot(*zip(*scales), color="tab:green", label="loss scale")
        skipped = [(r["step"], r["loss_scale"]) for r in steps if r.get("skipped")]
        if skipped:
            scale_ax.plot(*zip(*skipped), "x", color="tab:red", label="skipped step (inf/NaN grads)")
        scale_ax.set_yscale("log", base=2)
        scale_ax.legend()
        total = steps[-1].get("skipped_steps", 0)
        scale_ax.set(xlabel="optimizer step", ylabel="GradScaler scale (log2)",
                     title=f"Loss scale ({total} skipped step{'s' if total != 1 else ''})")
        scale_ax.grid(alpha=0.3)
    else:
        scale_ax.axis("off")
        scale_ax.text(0.5, 0.5, "No loss scaling in this precision\n(GradScaler is used for 16-mixed only)",
                      ha="center", va="center", fontsize=11)
    fig.suptitle(title or f"Training ({precision or 'from metrics.jsonl'})")
    return fig
