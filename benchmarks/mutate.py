"""Mutation check: plant realistic bugs in the package, one at a time, and see which the tests catch.

Each mutant names a file, a snippet (exact text or a regex) to find in it, and its replacement. For
each, the package and the tests are copied to a temporary folder, the mutant is applied there, and
the mutant's tests run (``pytest -x``): a failing run kills the mutant, a passing one lets it
survive. A snippet the file no longer holds (the code was refactored) makes the mutant *stale*:
reported, not applied, so the list can be updated rather than the run crashing. A snippet that
moved to another file of ``utils/`` (found there exactly once) is followed there.

    python benchmarks/mutate.py                 # every mutant; prints a table and killed/total
    python benchmarks/mutate.py --list          # the mutants and whether each still applies
    python benchmarks/mutate.py --only no-unscale --only ignore-max-grad-norm --jobs 2
    python benchmarks/mutate.py --jobs 2        # what `make mutate` runs: two at a time, one thread each

Slow (minutes: the tests run once per mutant), so not part of CI; ``make mutate`` runs it. The
exit status is 0 when every applicable mutant was killed, 1 when one survived, 2 when the
unmutated tests fail (nothing can be concluded then).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("utils", "tests", "pyproject.toml")  # what a test run needs; tests/browser is left out

# Test files per part of the package, the quickest and most pointed first (``-x`` stops at the
# first failure, so a killed mutant rarely runs them all). A file that no longer exists is dropped.
TESTS = {
    "loop": ["tests/test_loop_invariants.py", "tests/test_loop.py", "tests/test_amp_integration.py"],
    # what validation reports (accuracy, throughput): the tests that hold it, not the whole loop's files
    "evaluation": ["tests/test_loop.py::test_classifier_pairs_report_the_accuracy_of_the_models_predictions",
                   "tests/test_loop.py::test_throughput_excludes_validation_time"],
    "resolver": ["tests/test_precision.py", "tests/test_amp_integration.py"],
    "tier1": ["tests/test_tier1_checks.py", "tests/test_validation.py"],
    "callback": ["tests/test_amp_wandb.py"],
    "benchmark": ["tests/test_benchmark_recommendation.py", "tests/test_amp_benchmark.py"],
    # run safety (issue 24): the tests that hold each guarantee, by node id; the whole file runs
    # subprocesses that take a minute and catch none of these
    "safety": [f"tests/test_run_safety.py::{t}" for t in (
        "test_checkpoint_minutes_saves_when_that_much_time_passed_since_the_last_save",
        "test_checkpoint_minutes_is_read_at_log_steps_only",
        "test_resuming_with_another_seed_or_accumulation_is_an_error_that_writes_nothing",
        "test_resuming_into_another_folder_that_holds_a_run_is_an_error_that_writes_nothing",
        "test_a_token_id_equal_to_the_vocabulary_size_is_out_of_range",
        "test_fifty_skipped_steps_in_a_row_end_the_run_while_the_scale_is_still_high",
        "test_repair_cuts_a_torn_last_line_and_nothing_else",
        "test_repair_keeps_a_whole_last_record_whose_newline_is_missing",
        "test_repair_on_resume_keeps_the_records_the_checkpoint_knows_then_cuts_a_torn_line",
        "test_a_second_interrupt_mid_step_stops_at_once_and_saves_no_half_step",
        "test_a_second_interrupt_during_a_save_lets_the_save_finish",
    )],
}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    find: str  # exact text, or a regex when ``regex`` is True; must occur exactly once
    replace: str
    tests: str  # a key of TESTS
    regex: bool = False


LOOP, POSITION = "utils/training/loop/trainer.py", "utils/training/loop/position.py"
CHECKPOINT = "utils/training/runs/checkpoint.py"
METER, EVALUATE = "utils/training/loop/meter.py", "utils/training/loop/evaluate.py"
PRECISION, TIER1 = "utils/training/amp/precision.py", "utils/tiers/tier1.py"
GRADIENTS, NUMERICS = "utils/tiers/gradients.py", "utils/tiers/numerics.py"
MEMORY_SPEED = "utils/tiers/memory_speed.py"
CALLBACK = "utils/training/wandb_log/callback.py"
RUNNER, RESULTS = "utils/training/benchmark/runner.py", "utils/training/benchmark/results.py"
GUARDS, METRICS_LOG = "utils/training/loop/guards.py", "utils/training/runs/metrics_log.py"
BATCHES, INTERRUPTS = "utils/training/batches.py", "utils/training/loop/interrupts.py"

MUTANTS = [
    # -- the training loop: the bug classes of issue 19 first ----------------------------------
    Mutant("no-unscale", LOOP, r"\n\s*self\.scaler\.unscale_\(self\.optimizer\)", "", "loop", regex=True),
    Mutant("ignore-max-grad-norm", LOOP, "self.settings.max_grad_norm or math.inf", "math.inf", "loop"),
    Mutant("clip-at-1-always", LOOP, "self.settings.max_grad_norm or math.inf", "1.0", "loop"),
    Mutant("no-restore-scaler", LOOP, 'self.scaler.load_state_dict(state["scaler"])', "pass", "loop"),
    Mutant("restore-scale-not-tracker", LOOP, 'self.scaler.load_state_dict(state["scaler"])',
           'self.scaler.load_state_dict({**state["scaler"], "_growth_tracker": 0})', "loop"),
    Mutant("no-restore-scheduler", LOOP, 'self.scheduler.load_state_dict(state["scheduler"])', "pass",
           "loop"),
    Mutant("no-restore-skipped-steps", POSITION, 'state.get("skipped_steps", 0)', "0", "loop"),
    Mutant("no-restore-rng", POSITION,  # the TensorBatches path: its order is (seed, epoch); dropout is not
           r"if resume_rng is not None:\n(\s*)set_rng_state\(resume_rng\)\n(\s*)return batches\.epoch",
           r"if resume_rng is not None:\n\1pass\n\2return batches.epoch", "loop", regex=True),
    Mutant("scheduler-steps-on-skipped", LOOP, r"if not skipped:\n\s*self\.scheduler\.step\(\)",
           "self.scheduler.step()", "loop", regex=True),
    Mutant("skips-never-counted", METER, "self.skipped = new_scale < self.scale", "self.skipped = False", "loop"),
    Mutant("accumulation-not-averaged", LOOP, "loss = loss / accum", "loss = loss", "loop"),
    Mutant("accuracy-of-the-last-batch", EVALUATE, "correct += ((logits.argmax(-1) == targets) & mask).sum()",
           "correct = ((logits.argmax(-1) == targets) & mask).sum()", "evaluation"),
    Mutant("throughput-counts-validation", LOOP, "meter.tokens_done / max(wall - meter.eval_s, 1e-9)",
           "meter.tokens_done / max(wall, 1e-9)", "evaluation"),
    # -- Tier 1: checks made never to fail ------------------------------------------------------
    Mutant("determinism-never-fails", NUMERICS, r"if diff > 1e-6 \* max\(1\.0, details\[\"max_abs_output\"\]\):",
           "if False:", "tier1", regex=True),
    Mutant("vanishing-never-fails", GRADIENTS, "elif norm < vanishing_below:", "elif False:", "tier1"),
    Mutant("memory-never-fails", MEMORY_SPEED, "if available and smallest > available:", "if False:", "tier1"),
    Mutant("random-batch-nan-never-fails", NUMERICS, "if bad_trials:", "if False:", "tier1"),
    Mutant("batch-dim-never-checked", TIER1, "if out.dim() == 0 or out.shape[0] != b:", "if False:", "tier1"),
    Mutant("autocast-nan-never-fails", NUMERICS, 'if not details["autocast_finite"]:', "if False:", "tier1"),
    Mutant("gain-without-sqrt", NUMERICS, 'stats["std"] * math.sqrt(fan_in)', 'stats["std"] * fan_in', "tier1"),
    Mutant("buffers-not-counted", MEMORY_SPEED, "buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())",
           "buffer_bytes = 0", "tier1"),
    Mutant("adam-one-moment", MEMORY_SPEED, "trainable * size * 3", "trainable * size * 2", "tier1"),
    # -- the resolver ---------------------------------------------------------------------------
    Mutant("auto-ignores-cpu-bf16", PRECISION, r"if caps\.cpu_bf16:\n(\s*)return \"bf16-mixed\"",
           r'if False:\n\1return "bf16-mixed"', "resolver", regex=True),
    Mutant("implicit-cpu-fp16-honoured", PRECISION, "        if explicit_device:\n", "        if True:\n", "resolver"),
    Mutant("cuda-index-off-by-one", PRECISION, "index >= caps.cuda_count", "index > caps.cuda_count", "resolver"),
    Mutant("scaler-for-bf16-too", PRECISION, r'("bf16-mixed", torch\.bfloat16, torch\.float32, autocast=True), use_scaler=False',
           r"\1, use_scaler=True", "resolver", regex=True),
    Mutant("autocast-is-a-no-op", PRECISION, "return torch.autocast(self.device_type, dtype=self.autocast_dtype)",
           "return contextlib.nullcontext()", "resolver"),
    Mutant("bf16-allowed-on-gpu-without-it", PRECISION,
           'if dev.type == "cuda" and name.startswith("bf16") and not caps.cuda_bf16:', "if False:", "resolver"),
    Mutant("true-precisions-keep-fp32-weights", PRECISION,  # both "-true" rows of FACTS, one match
           r'("16-true", torch\.float16), torch\.float16(,.*\n\s*PrecisionFacts\("bf16-true", torch\.bfloat16), torch\.bfloat16',
           r"\1, torch.float32\2, torch.float32", "resolver", regex=True),
    Mutant("cpu-bf16-from-avx512f", PRECISION, '"x86": {"avx512_bf16": "AVX512-BF16"',
           '"x86": {"avx512f": "AVX512-BF16"', "resolver"),
    # -- the W&B callback -----------------------------------------------------------------------
    Mutant("overflow-flag-never-set", CALLBACK, '"amp/overflow": int(skipped > self._logged_skipped)',
           '"amp/overflow": 0', "callback"),
    Mutant("loop-skips-not-logged", CALLBACK, 'metrics.get("skipped_steps", 0)', "0", "callback"),
    Mutant("disabled-scaler-reported", CALLBACK,
           r"if is_enabled is not None and not is_enabled\(\):\n\s*return None", "pass", "callback", regex=True),
    Mutant("wandb-called-without-a-run", CALLBACK, r"run = self\._run\(\)\n\s*if run is None:\n\s*return\n",
           "run = self._run()\n", "callback", regex=True),
    Mutant("lightning-skips-counted-on-growth", CALLBACK, "scale < self._scale", "scale > self._scale", "callback"),
    # -- the benchmark --------------------------------------------------------------------------
    Mutant("speedup-inverted", RESULTS, "row.speedup = _ratio(base.step_time_s, row.step_time_s)",
           "row.speedup = _ratio(row.step_time_s, base.step_time_s)", "benchmark"),
    Mutant("tolerance-never-exceeded", RESULTS, "any(not abs(d) <= tolerance for d in deltas)",
           "any(False for d in deltas)", "benchmark"),
    Mutant("loss-delta-sign", RESULTS, "row.loss_delta = _delta(row.final_loss, base.final_loss)",
           "row.loss_delta = _delta(base.final_loss, row.final_loss)", "benchmark"),
    Mutant("throughput-from-fastest-step", RESULTS, "_ratio(items_per_step, self.step_time_s)",
           "_ratio(items_per_step, self.step_time_min_s)", "benchmark"),
    Mutant("warmup-steps-timed", RUNNER, "self.times[precision].append(times[self.warmup:])",
           "self.times[precision].append(times)", "benchmark"),
    Mutant("noise-never-flagged", RESULTS, "self.noisy = judged and not timing.meets_confidence(NOISE_BOUND)",
           "self.noisy = False", "benchmark"),
    Mutant("speed-called-within-the-spread", RESULTS, "return _quartiles(fast)[1] < _quartiles(slow)[0]",
           "return True", "benchmark"),
    Mutant("spread-judged-from-one-run", RESULTS, "judged = len(runs) >= MIN_RUNS", "judged = True", "benchmark"),
    Mutant("noise-from-single-steps", RESULTS, "self.run_step_times_s = [statistics.fmean(r) for r in runs]",
           "self.run_step_times_s = [t for r in runs for t in r]", "benchmark"),
    # -- run safety: the guarantees of issue 24 ---------------------------------------------------
    Mutant("checkpoint-minutes-read-as-hours", CHECKPOINT, "self._last_save >= 60 * minutes",
           "self._last_save >= 3600 * minutes", "safety"),
    Mutant("never-checkpoint-on-time", CHECKPOINT,
           "return bool(log_step and minutes and time.monotonic() - self._last_save >= 60 * minutes)",
           "return False", "safety"),
    Mutant("save-does-not-restart-the-clock", CHECKPOINT,
           r"\n\s*self\._last_save = time\.monotonic\(\)(\n\s*self\.saving = True)", r"\1", "safety",
           regex=True),
    Mutant("checkpoint-minutes-checked-off-log-steps", CHECKPOINT, "return bool(log_step and minutes and",
           "return bool(minutes and", "safety"),
    Mutant("resume-ignores-another-seed", CHECKPOINT, 'for name in ("grad_accum_steps", "seed"):',
           'for name in ("grad_accum_steps",):', "safety"),
    Mutant("resume-ignores-another-accumulation", CHECKPOINT, 'for name in ("grad_accum_steps", "seed"):',
           'for name in ("seed",):', "safety"),
    Mutant("resume-into-any-folder", CHECKPOINT,
           "resumed_here = self.path is not None and Path(self.path).resolve().parent == self.folder.resolve()",
           "resumed_here = self.path is not None", "safety"),
    Mutant("train-id-at-vocab-size-allowed", GUARDS, "if low < 0 or high >= self.vocab:",
           "if low < 0 or high > self.vocab:", "safety"),
    Mutant("val-id-at-vocab-size-allowed", BATCHES, "if low < 0 or high >= emb.num_embeddings:",
           "if low < 0 or high > emb.num_embeddings:", "safety"),
    Mutant("no-progress-only-below-the-floor", GUARDS,
           "(scale < SCALE_FLOOR or self.consecutive_skipped >= NO_PROGRESS_STEPS)", "(scale < SCALE_FLOOR)",
           "safety"),
    Mutant("skip-streak-never-reset", GUARDS,
           "self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0",
           "self.consecutive_skipped += int(skipped)", "safety"),
    Mutant("torn-line-kept", METRICS_LOG, r'end = data.rfind(b"\n") + 1', "end = len(data)", "safety"),
    Mutant("second-signal-ignored", INTERRUPTS, 'raise KeyboardInterrupt(f"a second {name}: stopping now")',
           "return", "safety"),
    Mutant("second-signal-cuts-a-save", INTERRUPTS, r"\n\s*if self\.saving\(\):.*\n\s*return", "", "safety",
           regex=True),
    Mutant("unterminated-record-dropped", METRICS_LOG, "if end < len(data) and _is_record(data[end:]):",
           "if False:", "safety"),
]


def _pattern(mutant: Mutant) -> str:
    return mutant.find if mutant.regex else re.escape(mutant.find)


def locate(mutant: Mutant, root: Path) -> tuple[Path | None, str]:
    """The one file under ``root`` to mutate: ``mutant.path`` when it holds the snippet once, else
    the one file of the package that does (the code moved in a refactor). ``(None, why)`` when stale."""
    pattern = re.compile(_pattern(mutant))
    named = root / mutant.path
    if named.is_file() and len(pattern.findall(named.read_text())) == 1:
        return named, ""
    hits = [(p, len(pattern.findall(p.read_text()))) for p in sorted((root / "utils").rglob("*.py"))]
    hits = [(p, n) for p, n in hits if n]
    if len(hits) == 1 and hits[0][1] == 1:
        return hits[0][0], ""
    where = ", ".join(f"{p.relative_to(root)} x{n}" for p, n in hits) or "no file of utils/"
    return None, f"the snippet must occur once; found in {where}"


def apply(mutant: Mutant, root: Path) -> tuple[str | None, str]:
    """Apply ``mutant`` to the copy under ``root``: ``(file mutated, "")``, or ``(None, why it is stale)``."""
    path, why = locate(mutant, root)
    if path is None:
        return None, why
    replace = mutant.replace if mutant.regex else mutant.replace.replace("\\", "\\\\")
    path.write_text(re.sub(_pattern(mutant), replace, path.read_text(), count=1))
    return str(path.relative_to(root)), ""


def copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "browser", ".hypothesis"))
        elif src.is_file():
            shutil.copy2(src, dest / name)


def test_files(group: str) -> list[str]:
    return [f for f in TESTS[group] if (ROOT / f.split("::")[0]).is_file()]  # a file, or a test's node id


def run_tests(root: Path, files: list[str], timeout: float, workers: int = 0,
              threads: int | None = None) -> tuple[str, float, str]:
    """``(outcome, seconds, last line)``: outcome is passed, failed, error (collection or usage) or timeout.
    ``workers`` > 1: pytest-xdist workers, as ``make test`` runs; ``threads``: torch threads of the run."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0",
           "WANDB_DIR": str(root / "wandb"), "PYTHONDONTWRITEBYTECODE": "1"}
    if threads:  # mutants run side by side: one thread each, as the xdist workers of `make test`
        env["OMP_NUM_THREADS"] = str(threads)
    # nbval (notebooks) and xdist (when unused) cost a second or two of imports per run: off
    parallel = ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else ["-p", "no:xdist"]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:nbval", "-W", "ignore",
           *parallel, *files]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else out.stderr.strip()[-200:]
    outcome = {0: "passed", 1: "failed"}.get(out.returncode, "error")
    return outcome, time.perf_counter() - t0, last


def run_mutant(mutant: Mutant, timeout: float, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        where, stale = apply(mutant, root)
        if where is None:
            return {"mutant": mutant, "file": mutant.path, "status": "stale", "seconds": 0.0, "detail": stale}
        outcome, seconds, last = run_tests(root, test_files(mutant.tests), timeout, threads=threads)
    status = {"passed": "SURVIVED", "failed": "killed", "error": "killed (error)", "timeout": "killed (timeout)"}
    return {"mutant": mutant, "file": where, "status": status[outcome], "seconds": seconds, "detail": last}


def baseline(groups: set[str], timeout: float, workers: int = 0) -> tuple[str, str]:
    files = list(dict.fromkeys(f for g in sorted(groups) for f in test_files(g)))
    whole = {f for f in files if "::" not in f}
    files = [f for f in files if "::" not in f or f.split("::")[0] not in whole]  # a file run whole holds its tests
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        copy_tree(Path(tmp))
        outcome, _, last = run_tests(Path(tmp), files, timeout * len(groups), workers=workers)
    return outcome, last


def print_table(results: list[dict]) -> None:
    width = max(len(r["mutant"].name) for r in results)
    print(f"{'mutant':<{width}}  {'file':<36}  {'status':<17}  {'time':>6}  detail")
    for r in results:
        m = r["mutant"]
        print(f"{m.name:<{width}}  {r['file']:<36}  {r['status']:<17}  {r['seconds']:>5.0f}s  {r['detail'][:70]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each applies")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"--only {unknown}: no such mutant. Mutants: {', '.join(m.name for m in MUTANTS)}.")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        with tempfile.TemporaryDirectory() as tmp:
            copy_tree(Path(tmp))
            for m in mutants:
                path, why = locate(m, Path(tmp))
                print(f"{m.name:<36} {str(path.relative_to(tmp)) if path else m.path:<36} {why or 'applies'}")
        return 0
    if not args.no_baseline:
        outcome, last = baseline({m.tests for m in mutants}, args.timeout, workers=args.jobs)
        if outcome != "passed":
            print(f"The unmutated tests do not pass ({outcome}: {last}); fix them first.")
            return 2
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        threads = 1 if args.jobs > 1 else None
        futures = {pool.submit(run_mutant, m, args.timeout, threads): m for m in mutants}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            r = future.result()
            print(f"[{done}/{len(mutants)}] {r['mutant'].name}: {r['status']} ({r['seconds']:.0f}s)", flush=True)
        results = [f.result() for f in futures]  # in declaration order
    print()
    print_table(results)
    live = [r for r in results if r["status"] != "stale"]
    killed = [r for r in live if r["status"].startswith("killed")]
    survived = [r["mutant"].name for r in live if r["status"] == "SURVIVED"]
    stale = [r["mutant"].name for r in results if r["status"] == "stale"]
    print(f"\nkilled {len(killed)}/{len(live)} in {time.perf_counter() - t0:.0f}s"
          + (f"; survived: {', '.join(survived)}" if survived else "")
          + (f"; stale (snippet not found, update the mutant): {', '.join(stale)}" if stale else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
