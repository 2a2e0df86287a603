"""Weights & Biases: starting a run (:mod:`~utils.training.wandb_log.session`) and logging the AMP
state each step and epoch (:mod:`~utils.training.wandb_log.callback`). wandb itself loads on first use."""
