"""A stand-in for the ``wandb`` module that records what it is asked to do (no wandb import)."""

import types


# ---- a stand-in for the wandb module ---------------------------------------------------------------
class FakeConfig:
    def __init__(self):
        self.values = {}

    def update(self, values, allow_val_change=False):
        self.values.update(values)


class FakeRun:
    """Records what a W&B run is asked to do: rows, config, summary, metric definitions, alerts."""

    def __init__(self):
        self.rows, self.config, self.summary, self.metrics, self.alerts = [], FakeConfig(), {}, [], []

    def log(self, row, step=None):
        self.rows.append((row, step))

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def alert(self, title, text, level=None):
        self.alerts.append((title, text, level))


def fake_wandb_module():
    """A ``wandb`` module with an active :class:`FakeRun`; put it in ``sys.modules["wandb"]``."""
    module = types.ModuleType("wandb")
    module.run = FakeRun()
    module.log = lambda row, step=None: module.run.log(row, step=step)  # as wandb.log logs to wandb.run
    return module
