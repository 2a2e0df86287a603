"""Follow ``train()``'s ``model`` through the code: print each stop and the counts issue 23 names.

A stop is a call site in ``utils/`` that passes the model (or one of its submodules) on into a
function of another module. Each distinct (call site, callee) counts once, however often it runs.
Also printed: how often the causality probe ran, the vocabulary was looked for, and ``forward``'s
signature was read during the one ``train()`` call.

    python benchmarks/model_stops.py
"""

from __future__ import annotations

import collections
import os
import sys

import torch
from torch import nn

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "utils")
COUNTED = {"probe_causal": "causality probe runs", "find_vocab_size": "vocabulary looked for",
           "_detect": "signature read (calls._detect)"}


def _module(filename: str) -> str | None:
    if not filename.startswith(ROOT):
        return None
    return "utils" + filename[len(ROOT):-3].replace(os.sep, ".")


def follow(run, model: nn.Module):
    """Run ``run()`` and return (ordered stops, counts of the named functions)."""
    parts = {id(m) for m in model.modules()}
    stops, counts = {}, collections.Counter()

    def holds_model(frame) -> bool:
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        for name in names:
            value = frame.f_locals.get(name)
            inner = getattr(value, "module", None) if not isinstance(value, nn.Module) else value
            if isinstance(value, nn.Module) and id(value) in parts or id(inner) in parts:
                return True
        return False

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = _module(frame.f_code.co_filename)
        if callee is None:
            return
        if frame.f_code.co_name in COUNTED:
            counts[COUNTED[frame.f_code.co_name]] += 1
        caller = frame.f_back
        source = _module(caller.f_code.co_filename) if caller else None
        if source is None or source == callee or not holds_model(frame):
            return
        key = (f"{source}:{caller.f_lineno}", f"{callee}.{frame.f_code.co_name}")
        stops.setdefault(key, len(stops))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return sorted(stops, key=stops.get), counts


def main() -> None:
    from utils.models.examples import example_model
    from utils.training import train

    torch.manual_seed(0)
    model = example_model("gpt-micro", n_layer=1)
    data = torch.randint(0, 256, (16, 17))
    stops, counts = follow(lambda: train(model, data[:12], val_data=data[12:], batch_size=4, max_steps=2,
                                         precision="32-true", progress=False), model)
    entered, seen, back = collections.Counter(), [], 0
    for site, callee in stops:
        module = callee.rsplit(".", 1)[0]
        entered[module] += 1
        back += module in seen
        seen.append(module)
        print(f"{site:55s} -> {callee}")
    print(f"\n{len(stops)} stops in {len(entered)} modules, {back} of them into a module already entered")
    for module, n in entered.most_common():
        print(f"  {n:3d}  {module}")
    for name in COUNTED.values():
        print(f"{name}: {counts[name]}")


if __name__ == "__main__":
    main()
