"""`pkt report`: the comparison table's arithmetic and its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import report


def write_eval(root: Path, name: str, **scores: float) -> None:
    (root / name).mkdir(parents=True)
    metrics = {task: {"score": score, "n": 100, "dropped": 0} for task, score in scores.items()}
    (root / name / "metrics.json").write_text(json.dumps({**metrics, "seconds": 12.5, "peak_rss_gib": 3.0}))


def test_report_computes_change_and_gap_closed(tmp_path):
    write_eval(tmp_path / "eval", "teacher", mmlu=0.53, gsm8k=0.40)
    write_eval(tmp_path / "eval", "student", mmlu=0.29, gsm8k=0.20)
    write_eval(tmp_path / "eval", "semalign", mmlu=0.41, gsm8k=0.20)
    result = report.run(tmp_path / "eval", tmp_path / "report", tmp_path / "runs", tmp_path / "metrics", echo=lambda *_: None)
    semalign = next(row for row in result["rows"] if row["name"] == "semalign")["scores"]
    assert semalign["mmlu"]["gap_closed"] == pytest.approx(0.5) and semalign["mmlu"]["delta"] == pytest.approx(0.12)
    assert semalign["gsm8k"]["gap_closed"] == pytest.approx(0.0)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| semalign | 41.0 (n=100), +12.0, gap closed 50% |" in table
    assert "| evaluate teacher | 12.5 | 3.0 |" in table
    assert (tmp_path / "report" / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert report.gap_closed(0.3, 0.3, 0.3) is None


def test_report_needs_teacher_and_student(tmp_path):
    write_eval(tmp_path / "eval", "student", mmlu=0.3)
    with pytest.raises(FileNotFoundError, match="lacks teacher/metrics.json"):
        report.run(tmp_path / "eval", tmp_path / "report")
