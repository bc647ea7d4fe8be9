"""The cross-tokenizer transfer benchmark's wiring (configs/transfer/mmlu-xtok-smoke.yaml,
experiments/transfer-xtok/dvc.yaml) on tiny models with different tokenizers: its extraction stores what its
four methods read and every method trains from it; and its control, `lora-sft` on the student's own tokens, is
plain lora-sft where the tokens are the cached ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkt_pipeline.cache import open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.tiny_models import save_tiny_cross_student
from stages import align, extract
from tiny_data import SMALL_LAYOUT

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SMOKE = PROJECT_ROOT / "configs/transfer/mmlu-xtok-smoke.yaml"
METHODS = ("uld", "alm", "semalign-xvocab", "lora-sft")
FAST = ["runtime.dtype=float32", "align.steps=2", "align.lora.r=4", "align.lora.alpha=8",
        "align.loader.shuffle_buffer=8", "align.checkpoint_every=1000"]


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.integration  # pkt extract, then four pkt align processes
def test_the_smoke_benchmark_extracts_what_its_methods_read_and_trains_each_across_tokenizers(
        tiny_pair, tiny_dataset, tmp_path):
    """The smoke config as the pipeline runs it (`pkt extract --config`, then `pkt align --config --method M`), its
    models, data and depth swapped for the tiny ones: the teacher (Qwen-style template, 384 tokens) and a student
    with its own vocabulary (320) and template."""
    student = save_tiny_cross_student(tmp_path / "student")
    cache = tmp_path / "cache"
    tiny = [f"teacher={tiny_pair['teacher']}", f"student={student}", f"extract.data={tiny_dataset}",
            f"extract.out={cache}", f"extract.metrics={tmp_path / 'extract.json'}", f"align.cache={cache}",
            "extract.limit=12", "extract.attribution_examples=2", "methods.semalign-xvocab.layers=[1, 2]", *SMALL_LAYOUT]
    extract.run(load_config(SMOKE, [*tiny, "runtime.dtype=float32"]), progress=False, echo=lambda *_: None)
    manifest = open_cache(cache).manifest
    rule = manifest.layers_rule
    assert rule["rule"] == "auto" and rule["methods"]["lora-sft"]["rule"] == "reads no cached teacher layer"
    assert {name for name, need in rule["methods"].items() if need["layers"]} == {"semalign-xvocab"}
    assert not manifest.extras, "no method of this benchmark reads a teacher extra"
    assert manifest.cross_tokenizer.target_logprob and manifest.cross_tokenizer.spans
    for method in METHODS:
        out = tmp_path / "runs" / method
        config = load_config(SMOKE, [*tiny, *FAST, f"align.method={method}", f"align.out={out}"])
        align.run(config, progress=False, echo=lambda *_: None)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 2 and (out / "model" / "tokenizer.json").is_file(), method
    control = log_of(tmp_path / "runs" / "lora-sft")
    assert all(entry["loss"] == pytest.approx(entry["ce"], rel=1e-6) for entry in control), \
        "the control's loss is its cross-entropy alone"
    assert json.loads((tmp_path / "runs" / "semalign-xvocab" / "metrics.json").read_text())["shared_vocabulary"]


def test_the_control_is_lora_sft_where_the_student_shares_the_teachers_tokens(tiny_pair, tiny_cache, tmp_path):
    """On a student of the teacher's tokenizer, ULD without its distillation term (the cross-tokenizer benchmark's
    `lora-sft`) takes the steps plain lora-sft takes on the cached ids: the same losses, step by step."""
    runs = {}
    for name, variant in (("plain", []), ("xtok", ["methods.lora-sft.method=uld", "methods.lora-sft.distill_weight=0.0"])):
        out = tmp_path / name
        config = load_config(overrides=[f"student={tiny_pair['student']}", f"align.cache={tiny_cache}",
                                        f"align.out={out}", "align.method=lora-sft", "align.batch_size=4",
                                        "align.lr=5e-3", *FAST, *variant])
        align.run(config, progress=False, echo=lambda *_: None)
        runs[name] = log_of(out)
    assert [entry["ce"] for entry in runs["xtok"]] == pytest.approx([entry["loss"] for entry in runs["plain"]], rel=1e-5)
