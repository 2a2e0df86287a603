"""benchmarks/gpu_check.py off a GPU: says what it would run and exits 0 (its real run needs CUDA)."""
from benchmarks import gpu_check


def test_the_dry_run_lists_every_check_and_builds_both_models(capsys):
    assert gpu_check.main(["--dry-run", "--skip-notebooks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpu_check: dry run; would run: CUDA tests, benchmark gpt-tiny, benchmark gpt-tiny-8x512, "
                          "memory plan gpt-tiny, memory plan gpt-tiny-8x512;")
    # 8 blocks of width 512 (12 d^2 weights, 13 d biases and norms each), token and position tables, final norm
    params = 8 * (12 * 512**2 + 13 * 512) + 4096 * 512 + 128 * 512 + 2 * 512
    assert f"gpt-tiny-8x512 ({params:,} params)" in out


def test_the_table_escapes_pipes_in_figures():
    assert gpu_check.table([("a", "ok", "x | y")]).splitlines()[-1] == "| a | ok | x / y |"
