"""`pkt report`: the comparison table's arithmetic and its files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from stages import report


def write_eval(root: Path, name: str, **scores: float) -> None:
    (root / name).mkdir(parents=True)
    metrics = {task: {"score": score, "n": 100, "dropped": 0} for task, score in scores.items()}
    (root / name / "metrics.json").write_text(json.dumps({**metrics, "seconds": 12.5, "peak_rss_gib": 3.0}))


def write_items(root: Path, name: str, task: str, verdicts: list[bool]) -> None:
    (root / name / "items").mkdir(parents=True, exist_ok=True)
    (root / name / "items" / f"{task}.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": "...", "correct": v}) + "\n" for i, v in enumerate(verdicts)))


def test_report_computes_change_and_gap_closed(tmp_path):
    write_eval(tmp_path / "eval", "teacher", mmlu=0.53, gsm8k=0.40)
    write_eval(tmp_path / "eval", "student", mmlu=0.29, gsm8k=0.20)
    write_eval(tmp_path / "eval", "semalign", mmlu=0.41, gsm8k=0.20)
    result = report.run(tmp_path / "eval", tmp_path / "report", tmp_path / "runs", tmp_path / "metrics", echo=lambda *_: None)
    semalign = next(row for row in result["rows"] if row["name"] == "semalign")["scores"]
    assert semalign["mmlu"]["gap_closed"] == pytest.approx(0.5) and semalign["mmlu"]["delta"] == pytest.approx(0.12)
    assert semalign["gsm8k"]["gap_closed"] == pytest.approx(0.0)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| semalign | 41.0 ±9.6 (n=100), +12.0, gap closed 50% |" in table
    assert "| evaluate teacher | 12.5 | 3.0 |" in table
    assert (tmp_path / "report" / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert report.gap_closed(0.3, 0.3, 0.3) is None


def test_report_needs_teacher_and_student(tmp_path):
    write_eval(tmp_path / "eval", "student", mmlu=0.3)
    with pytest.raises(FileNotFoundError, match="lacks teacher/metrics.json"):
        report.run(tmp_path / "eval", tmp_path / "report")


def test_change_interval_is_paired_over_the_same_items(tmp_path):
    student = [i % 10 < 3 for i in range(100)]                      # 30% right
    method = [s or i % 10 == 5 for i, s in enumerate(student)]       # the same 30 plus 10 more
    write_eval(tmp_path / "eval", "teacher", mmlu=0.50)
    write_eval(tmp_path / "eval", "student", mmlu=0.30)
    write_eval(tmp_path / "eval", "kd", mmlu=0.40)
    write_items(tmp_path / "eval", "student", "mmlu", student)
    write_items(tmp_path / "eval", "kd", "mmlu", method)
    result = report.run(tmp_path / "eval", tmp_path / "report", tmp_path / "runs", tmp_path / "metrics", echo=lambda *_: None)
    cell = next(row for row in result["rows"] if row["name"] == "kd")["scores"]["mmlu"]
    differences = [float(m) - float(s) for m, s in zip(method, student)]
    half = 1.959964 * statistics.stdev(differences) / len(differences) ** 0.5
    assert cell["delta_interval_95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert cell["delta_interval_95"][0] > 0, "a consistent 10-item gain on the same items is a measured change"
    assert cell["score_half_width_95"] == pytest.approx(1.959964 * (0.4 * 0.6 / 100) ** 0.5)
    assert "| kd | 40.0 ±9.6 (n=100), +10.0 [+4.1, +15.9], gap closed 50% |" in (tmp_path / "report" / "report.md").read_text()
