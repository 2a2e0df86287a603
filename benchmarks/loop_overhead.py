"""Does `utils.training.train()` cost anything over the loop a user would write by hand?

Times `train()` against a plain hand-written AMP loop (same model, same initial weights, same
batches, AdamW, gradient clipping), interleaved (ours, plain, ours, plain, ...) so machine drift
hits both alike, and prints per precision the median step-time ratio plain/ours (1.0 = no
overhead), plus each precision's speed over the plain fp32 loop measured in this same run.

    python benchmarks/loop_overhead.py                       # reference model, 32-true and bf16-mixed
    python benchmarks/loop_overhead.py --model gpt-micro --steps 30

Reference model (the default): gpt-tiny, decoder-only, vocab 4096, width 256, 4 layers, 4 heads,
context 128, batch 16.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.nn.functional as F

from utils.models.calls import get_logits
from utils.models.examples import example_model
from utils.training import PrecisionWarning, resolve_precision, train
from utils.training.amp.measure import StepClock
from utils.training.amp.precision import cpu_has_native_bf16
from utils.training.batches import TensorBatches


def run_ours(factory, init, data, plan, args, n_steps):
    model = factory()
    model.load_state_dict(init)
    clock = StepClock(plan.device)
    train(model, data, precision=plan, max_steps=n_steps, batch_size=args.batch_size, lr=3e-4,
          weight_decay=0.01, max_grad_norm=1.0, log_every=1, progress=False, callbacks=[clock], seed=0)
    return clock.step_times()[args.warmup:]


def run_plain(factory, init, data, plan, args, n_steps):
    """The loop a user writes by hand: nanoGPT-style, one autocast context, GradScaler when fp16."""
    model = factory().to(plan.device)
    model.load_state_dict(init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(plan.device_type, enabled=plan.use_scaler)
    ctx = plan.autocast
    clock = StepClock(plan.device)  # the clock train() runs with in run_ours, stamped by hand here
    clock.on_train_start(trainer=None)
    for _, x in zip(range(n_steps), TensorBatches(data, args.batch_size, seed=0).epoch(0)):
        x = x.to(plan.device)
        with ctx():
            logits = get_logits(model(x[:, :-1]))
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss.item()  # a hand-written loop reads its loss too; on a GPU this is the sync
        clock.on_step_end(trainer=None, metrics=None)
    return clock.step_times()[args.warmup:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-tiny", help="example model name (default: gpt-tiny, the reference)")
    p.add_argument("--precisions", default="32-true,bf16-mixed", help="comma-separated (default: 32-true,bf16-mixed)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--slow-steps", type=int, default=3,
                   help="timed steps for a precision this CPU only emulates (bf16 without AVX512-BF16/AMX; default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    factory = lambda: example_model(args.model)  # noqa: E731
    probe = factory()
    init = {k: v.clone() for k, v in probe.state_dict().items()}
    ctx_len, vocab = probe.config.block_size, probe.config.vocab_size
    native_bf16 = cpu_has_native_bf16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        plans = {name: resolve_precision(name, args.device) for name in args.precisions.split(",")}
    fp32 = resolve_precision("32-true", args.device)
    plans.setdefault("32-true", fp32)

    def steps_for(plan):
        slow = plan.device_type == "cpu" and plan.autocast_dtype is not None and not (
            plan.autocast_dtype == torch.bfloat16 and native_bf16)
        return args.slow_steps if slow else args.steps

    need = max(steps_for(pl) for pl in plans.values()) + args.warmup
    data = torch.randint(0, vocab, (need * args.batch_size, ctx_len + 1), generator=torch.Generator().manual_seed(0))
    print(f"model={args.model} batch={args.batch_size} context={ctx_len} device={fp32.device} "
          f"threads={torch.get_num_threads()} native_cpu_bf16={native_bf16}")
    if not native_bf16 and fp32.device_type == "cpu":
        print("note: this CPU has no native bf16 (no AVX512-BF16/AMX); bf16 and fp16 are emulated here and "
              f"run far slower than fp32, so they get --slow-steps={args.slow_steps} timed steps.")

    times = {(name, kind): [] for name in plans for kind in ("ours", "plain")}
    for r in range(args.repeats):
        for name, plan in plans.items():
            n = steps_for(plan) + args.warmup
            times[(name, "ours")] += run_ours(factory, init, data, plan, args, n)
            times[(name, "plain")] += run_plain(factory, init, data, plan, args, n)
            print(f"  repeat {r + 1}/{args.repeats} {name}: ours {statistics.median(times[(name, 'ours')]) * 1e3:.1f} ms, "
                  f"plain {statistics.median(times[(name, 'plain')]) * 1e3:.1f} ms (running medians)", flush=True)

    base = statistics.median(times[("32-true", "plain")])
    print("\nprecision   | ours median ms | plain median ms | plain/ours | ours vs plain fp32")
    print("------------|----------------|-----------------|------------|-------------------")
    for name in plans:
        ours, plain = statistics.median(times[(name, "ours")]), statistics.median(times[(name, "plain")])
        print(f"{name:<11} | {ours * 1e3:14.1f} | {plain * 1e3:15.1f} | {plain / ours:10.3f} | {base / ours:17.2f}x")
    print("\ntargets: plain/ours >= 0.98 in each precision; bf16-mixed >= 1.40x the plain fp32 loop "
          "(only reachable on a CPU with native bf16 or a GPU).")


if __name__ == "__main__":
    main()
