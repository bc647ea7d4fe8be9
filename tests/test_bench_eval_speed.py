"""bench/eval_speed.py end to end on the tiny model, as a subprocess: the JSON carries the items/s and
the CPU seconds per token of both sides, and the work counts agree with the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_eval_speed_tiny_records_cpu_seconds_per_token(tmp_path):
    out = tmp_path / "eval_speed.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "eval_speed.py"), "--tiny", "--tasks", "gsm8k", "--limit", "5",
                    "--batch-size", "4", "--reference-batch-size", "2", "--max-new-tokens", "6", "--no-stop",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.read_text())
    assert result["batch_size_after"] == 4 and result["limit"] == 5
    row = result["results"][0]
    assert row["n"] == 5 and row["verdicts_same"]
    # Static batches of 2 over 5 items: 3 batches, each decoding 1..6 columns for all its rows.
    assert row["after_new_tokens"] <= row["before_row_steps"] <= 5 * 6
    assert row["before_cpu_s"] > 0 and row["after_cpu_s"] > 0
    assert abs(row["after_cpu_s_per_token"] * row["after_new_tokens"] - row["after_cpu_s"]) < 0.01
    assert abs(row["before_cpu_s_per_row_step"] * row["before_row_steps"] - row["before_cpu_s"]) < 0.01
