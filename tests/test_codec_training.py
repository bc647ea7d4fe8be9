"""bench/codec_training.py on the tiny pair: the real stages as subprocesses, one cache per codec setting.

Pins what the real run's table rests on: every codec row carries its cache size, fidelity, loss curves
and paired change; the bf16 row compared with itself is exactly zero; KD reads only the top-k, so a
cache that differs from bf16 only in its activation rows trains KD to the same losses and scores; and a
rerun over finished outputs runs no stage again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_dataset

# One tiny run is ~20 pkt processes (4 codecs: extract, 2 aligns, 2 evals): minutes, so CI runs it, `make test` does not.
pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CODECS = ["bfloat16", "float8_e4m3", "int8", "topk_uint8"]
METHODS = ["kd", "semalign"]


def bench(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "bench/codec_training.py", "--tiny", "--dir", str(folder),
                             "--out", str(folder / "result.json")],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict, str]:
    require_dataset("transfer-splits")  # the tiny config extracts mmlu/train ...
    require_dataset("mmlu")  # ... and scores the MMLU test set
    folder = tmp_path_factory.mktemp("codec_training")
    printed = bench(folder).stdout
    return folder, json.loads((folder / "result.json").read_text()), printed


def test_every_codec_row_has_its_cache_fidelity_losses_and_paired_change(tiny_run):
    _, result, printed = tiny_run
    assert list(result["codecs"]) == CODECS and result["reference"] == "bfloat16" and result["metric"] == "p_correct"
    for codec, row in result["codecs"].items():
        assert row["cache"]["bytes_per_token"] > 0 and row["cache"]["layers"]
        assert row["versus_bfloat16"]["topk_ids_equal"]
        for method in METHODS:
            run = row["methods"][method]
            assert len(run["loss_curve"]) == 6  # configs/tiny.yaml: align.steps
            assert all(math.isfinite(loss) for loss in run["loss_curve"])
            assert run["loss_final"] == run["loss_curve"][-1]
            assert 0 < run["p_correct"] < 1 and run["n"] == 8  # configs/tiny.yaml: eval.limit
            assert run["p_correct_change_from_bfloat16"]["n"] == 8
        assert codec in printed
    sizes = {codec: row["cache"]["bytes_per_token"] for codec, row in result["codecs"].items()}
    assert max(sizes["float8_e4m3"], sizes["int8"], sizes["topk_uint8"]) < sizes["bfloat16"]


def test_the_reference_row_is_exactly_zero_against_itself(tiny_run):
    _, result, _ = tiny_run
    row = result["codecs"]["bfloat16"]
    assert row["versus_bfloat16"]["hidden"]["relative_l2_mean"] == 0 and row["versus_bfloat16"]["topk_kl_max"] == 0
    for method in METHODS:
        assert row["methods"][method]["loss_max_abs_difference_from_bfloat16"] == 0
        assert row["methods"][method]["p_correct_change_from_bfloat16"] == {
            "mean": 0.0, "interval_95": [0.0, 0.0], "half_width_95": 0.0, "n": 8}


def test_kd_reads_only_the_topk_so_lossy_rows_leave_it_unchanged(tiny_run):
    """float8/int8 caches hold the bf16 cache's exact top-k: KD trains to the same losses, bit for bit,
    while SemAlign, which reads the rows, moves; the uint8 top-k cache holds the same bf16 rows."""
    _, result, _ = tiny_run
    for codec in ("float8_e4m3", "int8"):
        kd = result["codecs"][codec]["methods"]["kd"]
        assert kd["loss_max_abs_difference_from_bfloat16"] == 0 and kd["p_correct_change_from_bfloat16"]["mean"] == 0
        assert result["codecs"][codec]["methods"]["semalign"]["loss_max_abs_difference_from_bfloat16"] > 0
        assert result["codecs"][codec]["versus_bfloat16"]["topk_kl_max"] == 0
    uint8 = result["codecs"]["topk_uint8"]["versus_bfloat16"]
    assert uint8["hidden"]["relative_l2_mean"] == 0 and 0 < uint8["topk_kl_max"] < 1e-4


def test_a_rerun_skips_every_finished_stage(tiny_run):
    folder, result, _ = tiny_run
    printed = bench(folder).stdout
    assert printed.count("done before, skipped") == len(CODECS) * (1 + 2 * len(METHODS))
    again = json.loads((folder / "result.json").read_text())
    assert again["codecs"] == result["codecs"]
    for codec in CODECS:
        for method in METHODS:
            run = folder / codec / "runs" / method
            assert not (run / "model").exists() and (run / "adapter").is_dir()  # scored, so only the adapter kept
