"""`pkt report`: the comparison table's arithmetic and its files."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from stages import report


def settings(tmp_path: Path) -> report.ReportConfig:
    return report.ReportConfig(tmp_path / "eval", tmp_path / "report", tmp_path / "runs", tmp_path / "metrics")


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
    result = report.run(settings(tmp_path), echo=lambda *_: None)
    semalign = next(row for row in result["rows"] if row["name"] == "semalign")["scores"]
    accuracy = semalign["mmlu"]["accuracy"]
    assert accuracy["gap_closed"] == pytest.approx(0.5) and accuracy["delta"] == pytest.approx(0.12)
    assert semalign["gsm8k"]["accuracy"]["gap_closed"] == pytest.approx(0.0)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| semalign | 41.0 ±9.6 (n=100) | +12.0 | 50% |" in table
    assert "| evaluate teacher | 12.5 | 3.0 |" in table
    assert (tmp_path / "report" / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert report.gap_closed(0.3, 0.3, 0.3) is None


def test_the_report_command_builds_its_config_from_the_flags(tmp_path):
    write_eval(tmp_path / "eval", "student", mmlu=0.30)
    write_eval(tmp_path / "eval", "kd", mmlu=0.40)
    for name, verdicts in (("student", [i % 10 < 3 for i in range(100)]), ("kd", [i % 10 < 4 for i in range(100)])):
        write_items(tmp_path / "eval", name, "mmlu", verdicts)
    result = subprocess.run([sys.executable, "-m", "pkt_pipeline.cli", "report", "--eval-dir", str(tmp_path / "eval"),
                             "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"),
                             "--metrics-dir", str(tmp_path / "metrics"), "--compare", "kd:student"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'out' / 'report.md'}" in result.stdout
    compared = json.loads((tmp_path / "out" / "report.json").read_text())["comparisons"]
    assert [(c["a"], c["b"], c["metric"]) for c in compared] == [("kd", "student", "accuracy")]
    assert compared[0]["mean"] == pytest.approx(0.10)


def test_report_needs_the_student(tmp_path):
    write_eval(tmp_path / "eval", "teacher", mmlu=0.5)
    with pytest.raises(FileNotFoundError, match="lacks student/metrics.json"):
        report.run(settings(tmp_path))


def test_report_without_the_teacher_pairs_changes_and_leaves_the_gap_blank(tmp_path):
    write_eval(tmp_path / "eval", "student", mmlu=0.30)
    write_eval(tmp_path / "eval", "kd", mmlu=0.40)
    write_items(tmp_path / "eval", "student", "mmlu", [i % 10 < 3 for i in range(100)])
    write_items(tmp_path / "eval", "kd", "mmlu", [i % 10 < 4 for i in range(100)])
    result = report.run(settings(tmp_path), echo=lambda *_: None)
    kd = next(row for row in result["rows"] if row["name"] == "kd")["scores"]["mmlu"]["accuracy"]
    assert kd["delta"] == pytest.approx(0.10) and kd["delta_interval_95"] is not None and kd["gap_closed"] is None
    assert "gap closed needs `pkt eval TEACHER" in (tmp_path / "report" / "report.md").read_text()


def test_change_interval_is_paired_over_the_same_items(tmp_path):
    student = [i % 10 < 3 for i in range(100)]                      # 30% right
    method = [s or i % 10 == 5 for i, s in enumerate(student)]       # the same 30 plus 10 more
    write_eval(tmp_path / "eval", "teacher", mmlu=0.50)
    write_eval(tmp_path / "eval", "student", mmlu=0.30)
    write_eval(tmp_path / "eval", "kd", mmlu=0.40)
    write_items(tmp_path / "eval", "student", "mmlu", student)
    write_items(tmp_path / "eval", "kd", "mmlu", method)
    result = report.run(settings(tmp_path), echo=lambda *_: None)
    cell = next(row for row in result["rows"] if row["name"] == "kd")["scores"]["mmlu"]["accuracy"]
    differences = [float(m) - float(s) for m, s in zip(method, student)]
    half = 1.959964 * statistics.stdev(differences) / len(differences) ** 0.5
    assert cell["delta_interval_95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert cell["delta_interval_95"][0] > 0, "a consistent 10-item gain on the same items is a measured change"
    assert cell["half_width_95"] == pytest.approx(1.959964 * (0.4 * 0.6 / 100) ** 0.5)
    assert "| kd | 40.0 ±9.6 (n=100) | +10.0 [+4.1, +15.9] | 50% |" in (tmp_path / "report" / "report.md").read_text()


def write_records(root: Path, name: str, task: str, records: list[dict]) -> None:
    (root / name / "items").mkdir(parents=True, exist_ok=True)
    (root / name / "items" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    verdicts = [r["correct"] for r in records if r.get("correct") is not None]
    continuous = [key for key in records[0] if key not in ("id", "prompt", "correct")]  # as `pkt eval` lists them
    (root / name / "metrics.json").write_text(json.dumps(
        {task: {"score": sum(verdicts) / len(verdicts), "n": len(verdicts), "continuous": continuous, "dropped": 0}}))


def test_continuous_metric_and_method_vs_method_interval_by_hand(tmp_path):
    """Four GSM8K items, NLL on all, accuracy on two; every number below is worked out by hand."""
    nll = {"teacher": [1.0, 1.0, 1.0, 1.0], "student": [2.0, 2.2, 1.8, 2.0],
           "semalign": [1.5, 1.6, 1.5, 1.4], "kd": [1.7, 1.7, 1.7, 1.9]}
    for name, values in nll.items():
        write_records(tmp_path / "eval", name, "gsm8k", [
            {"id": f"g{i}", "nll": v, "correct": (name != "student") if i < 2 else None} for i, v in enumerate(values)])
    result = report.run(settings(tmp_path), echo=lambda *_: None)
    semalign = next(row for row in result["rows"] if row["name"] == "semalign")["scores"]["gsm8k"]
    assert semalign["nll"]["value"] == pytest.approx(1.5) and semalign["nll"]["n"] == 4
    # change from the student: differences -0.5, -0.6, -0.3, -0.6 -> mean -0.5, sd 0.141421
    half = 1.959964 * 0.1414214 / 2
    assert semalign["nll"]["delta_interval_95"] == pytest.approx([-0.5 - half, -0.5 + half], abs=1e-6)
    assert semalign["nll"]["gap_closed"] == pytest.approx(0.5)  # (1.5 - 2.0) / (1.0 - 2.0)
    assert semalign["accuracy"]["n"] == 2 and semalign["accuracy"]["value"] == 1.0
    # semalign - kd: differences -0.2, -0.1, -0.2, -0.5 -> mean -0.25, sd 0.173205
    pair = next(c for c in result["comparisons"] if (c["a"], c["b"], c["metric"]) == ("semalign", "kd", "nll"))
    half = 1.959964 * 0.1732051 / 2
    assert pair["mean"] == pytest.approx(-0.25) and pair["interval_95"] == pytest.approx([-0.25 - half, -0.25 + half], abs=1e-6)
    assert pair["n"] == 4
    assert not any(c["b"] == "lora-sft" for c in result["comparisons"]), "absent methods are skipped"
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| semalign − kd | gsm8k | nll | -0.250 [-0.420, -0.080] | 4 |" in table
    resolution = {(r["task"], r["metric"]): r for r in result["resolution"]}
    assert resolution[("gsm8k", "nll")]["n"] == 4


def test_cli_report_refuses_a_malformed_comparison(tmp_path):
    from click.testing import CliRunner

    from pkt_pipeline.cli import main

    result = CliRunner().invoke(main, ["report", "--eval-dir", str(tmp_path), "--compare", "semalign-kd"])
    assert result.exit_code != 0 and "not of the form A:B" in result.output


def test_results_written_before_tasks_listed_their_continuous_values_show_the_known_ones(tmp_path):
    """A `metrics.json` without `continuous` (pkt eval before it wrote one) shows the known values it holds."""
    for name, p_correct in (("student", [0.2, 0.4]), ("kd", [0.4, 0.5])):
        write_records(tmp_path / "eval", name, "mmlu", [
            {"id": f"q{i}", "p_correct": p, "correct": p > 0.3} for i, p in enumerate(p_correct)])
        path = tmp_path / "eval" / name / "metrics.json"
        metrics = json.loads(path.read_text())
        del metrics["mmlu"]["continuous"]
        metrics["mmlu"].update(p_correct=sum(p_correct) / 2, p_correct_n=2)
        path.write_text(json.dumps(metrics))
    result = report.run(settings(tmp_path), echo=lambda *_: None)
    assert result["metrics"] == {"mmlu": ["correct", "p_correct"]}
    kd = next(row for row in result["rows"] if row["name"] == "kd")["scores"]["mmlu"]
    assert kd["p_correct"]["delta"] == pytest.approx(0.15)


def test_dev_rows_are_reported_by_p_correct_and_nll_paired(tmp_path):
    """`pkt eval --dev` records: MMLU rows carry p_correct, every row its reply NLL; both get paired changes."""
    def write_dev(name: str, p_correct: list[float], nll: list[float]) -> None:
        (tmp_path / "eval" / name / "items").mkdir(parents=True)
        records = [{"id": f"r{i}", "nll": v, **({"p_correct": p, "correct": p > 0.5} if p is not None else {})}
                   for i, (p, v) in enumerate(zip(p_correct, nll))]
        (tmp_path / "eval" / name / "items" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(
            {"dev": {"score": None, "n": 2, "continuous": ["p_correct", "nll"]}}))

    write_dev("teacher", [0.8, 0.9, None], [0.5, 0.6, 0.7])
    write_dev("student", [0.3, 0.4, None], [1.5, 1.6, 1.7])
    write_dev("kd", [0.4, 0.6, None], [1.0, 1.2, 1.2])
    result = report.run(settings(tmp_path), echo=lambda *_: None)
    kd = next(row for row in result["rows"] if row["name"] == "kd")["scores"]["dev"]
    assert kd["p_correct"]["n"] == 2 and kd["p_correct"]["delta"] == pytest.approx(0.15)
    assert kd["nll"]["n"] == 3 and kd["nll"]["delta"] == pytest.approx(-1.4 / 3)
    assert kd["nll"]["gap_closed"] == pytest.approx((1.4 / 3) / 1.0)
    assert "### dev" in (tmp_path / "report" / "report.md").read_text()


XTOK = ("student", "uld", "alm", "semalign-xvocab", "lora-sft")


def write_mmlu(root: Path, name: str, p_correct: list[float], ids: list[str] | None = None) -> None:
    """MMLU records as `pkt eval` writes them: right when the correct letter is the likeliest (p > 0.5 here)."""
    ids = ids or [f"m{i}" for i in range(len(p_correct))]
    write_records(root, name, "mmlu", [{"id": i, "correct": p > 0.5, "p_correct": p} for i, p in zip(ids, p_correct)])


def test_a_teacher_evaluated_by_another_benchmark_gives_the_gap_on_the_same_items(tmp_path):
    """The cross-tokenizer benchmark reads the same-tokenizer one's teacher evaluation (`--teacher-eval`): the teacher
    row's change from the student is the teacher-student gap paired over the same questions, every method's gap
    closed is against it, and the methods are compared with the control and with each other."""
    from click.testing import CliRunner

    from pkt_pipeline.cli import main

    student = [0.2, 0.3, 0.6, 0.4, 0.1, 0.7, 0.2, 0.3]
    teacher = [0.9, 0.8, 0.7, 0.6, 0.3, 0.9, 0.4, 0.8]
    write_mmlu(tmp_path / "same-tokenizer", "teacher", teacher)
    write_mmlu(tmp_path / "eval", "student", student)
    for shift, name in enumerate(XTOK[1:], start=1):
        write_mmlu(tmp_path / "eval", name, [p + 0.02 * shift * (i % 3) for i, p in enumerate(student)])
    result = CliRunner().invoke(main, ["report", "--eval-dir", str(tmp_path / "eval"), "--out", str(tmp_path / "report"),
                                       "--runs-dir", str(tmp_path / "runs"), "--metrics-dir", str(tmp_path / "metrics"),
                                       "--teacher-eval", str(tmp_path / "same-tokenizer" / "teacher")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {row["name"]: row["scores"]["mmlu"] for row in written["rows"]}
    assert list(rows) == ["teacher", "student", "alm", "lora-sft", "semalign-xvocab", "uld"]
    gaps = [t - s for t, s in zip(teacher, student)]
    half = 1.959964 * statistics.stdev(gaps) / len(gaps) ** 0.5
    gap = rows["teacher"]["p_correct"]
    assert gap["delta"] == pytest.approx(statistics.mean(gaps))
    assert gap["delta_interval_95"] == pytest.approx([statistics.mean(gaps) - half, statistics.mean(gaps) + half])
    uld = rows["uld"]["p_correct"]
    assert uld["gap_closed"] == pytest.approx(uld["delta"] / statistics.mean(gaps))
    assert {(c["a"], c["b"]) for c in written["comparisons"]} == {
        ("uld", "lora-sft"), ("alm", "lora-sft"), ("semalign-xvocab", "lora-sft"), ("semalign-xvocab", "alm"),
        ("semalign-xvocab", "uld"), ("alm", "uld")}
    assert all(c["n"] == len(student) for c in written["comparisons"])
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| alm − uld | mmlu | p_correct |" in table
    assert f"| evaluate teacher (reused: {tmp_path / 'same-tokenizer' / 'teacher'}) |" in table


def test_a_reused_teacher_evaluation_of_other_items_is_refused_naming_both(tmp_path):
    write_mmlu(tmp_path / "eval", "student", [0.2, 0.3, 0.6])
    write_mmlu(tmp_path / "other", "teacher", [0.9, 0.8, 0.7], ids=["m0", "m1", "m9"])
    config = report.ReportConfig(tmp_path / "eval", tmp_path / "report", teacher_eval=tmp_path / "other" / "teacher")
    with pytest.raises(ValueError, match=f"the teacher's evaluation {tmp_path / 'other' / 'teacher'} scored other mmlu "
                                         rf"items \(accuracy\) than the student's {tmp_path / 'eval' / 'student'}: "
                                         "2 in common of 3 and 3"):
        report.run(config, echo=lambda *_: None)
    missing = report.ReportConfig(tmp_path / "eval", tmp_path / "report", teacher_eval=tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=f"--teacher-eval {tmp_path / 'none'} holds no metrics.json"):
        report.run(missing, echo=lambda *_: None)
    write_mmlu(tmp_path / "eval", "teacher", [0.9, 0.8, 0.7])
    with pytest.raises(ValueError, match="two teacher evaluations"):
        report.run(config, echo=lambda *_: None)
