"""benchmarks/gpu_check.py off a GPU: says what it would run and exits 0 (its real run needs CUDA)."""
from benchmarks import gpu_check


def test_the_dry_run_lists_every_check_and_builds_both_models(capsys):
    assert gpu_check.main(["--dry-run", "--skip-notebooks"]) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("gpu_check: dry run; would run: CUDA tests, benchmark gpt-tiny, benchmark gpt-tiny-8x512, "
                          "memory plan gpt-tiny, memory plan gpt-tiny-8x512, FSDP gpt-tiny (1 GPU);")
    # 8 blocks of width 512 (12 d^2 weights, 13 d biases and norms each), token and position tables, final norm
    params = 8 * (12 * 512**2 + 13 * 512) + 4096 * 512 + 128 * 512 + 2 * 512
    assert f"gpt-tiny-8x512 ({params:,} params)" in out


def test_the_table_escapes_pipes_in_figures():
    assert gpu_check.table([("a", "ok", "x | y")]).splitlines()[-1] == "| a | ok | x / y |"


def test_missing_packages_skip_their_checks_in_one_line(monkeypatch, capsys):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name: None if name in ("papermill", "pytest") else real(name))
    assert gpu_check.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("gpu_check: skipped notebooks (papermill) (missing papermill); CUDA tests (missing pytest).")
    assert lines[2].startswith("gpu_check: dry run; would run: benchmark gpt-tiny, ")


def test_an_old_torch_is_named_with_the_version_needed(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch, "__version__", "2.4.1+cu121")
    assert gpu_check.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "gpu_check: torch 2.4.1+cu121 found at " in out
    assert out.rstrip().endswith("the project needs torch >= 2.6 (FSDP2's fully_shard). Use a newer Python environment.")
