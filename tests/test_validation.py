"""User errors met at run time get one clear line (naming the file, key or model), never a traceback;
Ctrl-C anywhere exits 130; --no-progress hides the libraries' bars too. Through the real `pkt` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stages import extract
from tiny_data import SMALL_LAYOUT, extract_config, write_dataset


def pkt(*args: str, cwd=None, env=None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pkt_pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **(env or {})}, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def settings(*overrides: str) -> list[str]:
    return [x for o in [*SMALL_LAYOUT, "runtime.dtype=float32", *overrides] for x in ("--set", o)]


def test_top_k_above_the_vocabulary_is_refused_at_extraction_start(tiny_pair, tiny_dataset, tmp_path):
    config = extract_config(tiny_pair["teacher"], tiny_dataset, tmp_path / "cache", "extract.top_k=100000")
    with pytest.raises(ValueError, match=r"^extract\.top_k \(100000\) exceeds the teacher's vocabulary size \(\d+\)$"):
        extract.run(config, progress=False)
    assert not (tmp_path / "cache").exists()


def test_non_utf8_data_names_the_file_and_line(tiny_pair, tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", 3)
    lines = data.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"the", b"th\xe9", 1)  # latin-1 text in a UTF-8 file
    data.write_bytes(b"\n".join(lines))
    code, stderr = finish(pkt("extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(data),
                              "--out", str(tmp_path / "cache"), "--no-progress", *settings(), cwd=tmp_path))
    assert code == 1 and "Traceback" not in stderr, stderr
    assert f"Error: {data}:2: not UTF-8 text (byte 0xe9 at position " in stderr and "save the file as UTF-8" in stderr


def test_non_utf8_dev_rows_and_config_name_the_file_and_line(tmp_path):
    from pkt_pipeline.config import ConfigError, load_config
    from pkt_pipeline.evaluation.dev import load_dev_rows

    rows = write_dataset(tmp_path / "dev.jsonl", 3)
    rows.write_bytes(rows.read_bytes() + b'{"messages": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"^{rows}:4: not UTF-8 text \(byte 0xff at position 15 of the line\)"):
        load_dev_rows([str(rows)])
    config = tmp_path / "c.yaml"
    config.write_bytes(b"align:\n  lr: 0.001\n  out: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{config}:3: not UTF-8 text"):
        load_config(config)


@pytest.mark.integration
def test_ctrl_c_during_attribution_exits_130(tiny_pair, tiny_dataset, tmp_path):
    attribution = write_dataset(tmp_path / "attribution.jsonl", 4000, seed=3)
    # As from a terminal: a suite started in the background (`cmd &` in a script) inherits SIGINT ignored,
    # and Python then keeps it ignored in the child.
    process = pkt("extract", "--teacher", str(tiny_pair["teacher"]), "--data", str(tiny_dataset),
                  "--out", str(tmp_path / "cache"),
                  *settings(f"extract.attribution_data={attribution}", "extract.attribution_examples=0"), cwd=tmp_path,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    # Every group in the ledger: extraction is done and attribution (4000 examples) starts. Read from the
    # files, not the progress bar on stderr, whose reader may lag the process by seconds.
    cache, deadline = tmp_path / "cache", time.time() + 240
    while not ((cache / "run.json").exists() and len(list((cache / "ledger").glob("*.json"))) ==
               json.loads((cache / "run.json").read_text())["layout"]["groups"]):
        assert process.poll() is None and time.time() < deadline, "".join(seen)
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    reader.join(timeout=10)
    stderr = "".join(seen)
    assert "interrupted: what was finished is kept; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert len(list((tmp_path / "cache" / "ledger").glob("*.json"))) == json.loads(
        (tmp_path / "cache" / "run.json").read_text())["layout"]["groups"]


@pytest.mark.integration
def test_extract_with_laten_without_a_student_says_a_student_is_needed(tiny_pair, tmp_path):
    write_dataset(tmp_path / "extract.jsonl", 3, seed=1)
    write_dataset(tmp_path / "align.jsonl", 8, seed=2)
    data = write_dataset(tmp_path / "train.jsonl", 8)
    common = ["--teacher", str(tiny_pair["teacher"]), "--data", str(data), "--out", str(tmp_path / "cache"),
              "--no-progress", *settings("methods.laten.teacher.locate_examples=1")]
    offline = {"HF_HUB_OFFLINE": "1"}  # the default student is then a hub id that fails at once
    code, stderr = finish(pkt("extract", *common, "--with", "laten", cwd=tmp_path, env=offline))
    assert code == 1 and "Traceback" not in stderr, stderr
    assert ("\nError: `pkt extract --with laten` needs the student, whose width sets how many neurons transfer: "
            "pass --student (or set `student`): could not load the config of hub id "
            "'models/qwen2.5-coder-0.5b-instruct'") in stderr, stderr
    assert "free space" not in stderr
    # the cache itself is complete; adding the extra to it says the same, and --student then adds it
    code, stderr = finish(pkt("extract", *common, "--with", "laten", cwd=tmp_path, env=offline))
    assert code == 1 and "Traceback" not in stderr and "needs the student" in stderr, stderr
    code, stderr = finish(pkt("extract", *common, "--with", "laten", "--student", str(tiny_pair["student"]),
                              cwd=tmp_path, env=offline))
    assert code == 0, stderr


@pytest.fixture(scope="module")
def narrow_student(tiny_pair, tmp_path_factory) -> Path:
    """The tiny student with 10 fewer embedding rows than its tokenizer has tokens."""
    from pkt_pipeline.models import load_tokenizer
    from pkt_pipeline.tiny_models import STUDENT_SHAPE, build_model

    tokenizer = load_tokenizer(tiny_pair["student"])
    folder = tmp_path_factory.mktemp("narrow") / "student"
    build_model(STUDENT_SHAPE, len(tokenizer) - 10, 2, tokenizer.eos_token_id, tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def embedding_message(folder: Path) -> str:
    from pkt_pipeline.models import load_tokenizer

    size = len(load_tokenizer(folder))
    return (f"the model at {folder} embeds {size - 10} tokens but its tokenizer has {size}: token ids "
            f"{size - 10}..{size - 1} have no embedding row")


def test_eval_of_a_student_whose_embedding_is_smaller_than_its_tokenizer_says_so(narrow_student, tiny_dataset,
                                                                                 tmp_path):
    code, stderr = finish(pkt("eval", str(narrow_student), "--dev", str(tiny_dataset), "--limit", "2",
                              "--out", str(tmp_path / "eval"), "--no-progress", "--set", "runtime.dtype=float32",
                              cwd=tmp_path))
    assert code == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"Error: {embedding_message(narrow_student)}"), stderr


def test_align_of_a_student_whose_embedding_is_smaller_than_its_tokenizer_says_so(narrow_student, tiny_cache,
                                                                                  tmp_path):
    from pkt_pipeline.config import load_config
    from pkt_pipeline.models import ModelLoadError
    from stages import align

    config = load_config(overrides=[f"student={narrow_student}", f"align.cache={tiny_cache}", "align.method=kd",
                                    f"align.out={tmp_path / 'run'}", "align.steps=1", "runtime.dtype=float32"])
    with pytest.raises(ModelLoadError, match=embedding_message(narrow_student).replace(".", r"\.")):
        align.run(config, progress=False)


@pytest.mark.integration
def test_no_progress_hides_the_bars_of_transformers_too(tiny_teacher_gguf, tiny_pair, tiny_dataset, tmp_path):
    """Loading a GGUF model draws transformers' conversion bar, a local folder its weight-loading bar."""
    for model in (tiny_teacher_gguf, tiny_pair["student"]):
        code, stderr = finish(pkt("eval", str(model), "--dev", str(tiny_dataset), "--limit", "2", "--no-progress",
                                  "--out", str(tmp_path / model.name), "--set", "runtime.dtype=float32", cwd=tmp_path))
        assert code == 0, stderr
        assert "%|" not in stderr and "de-quantizing" not in stderr and "Loading weights" not in stderr, stderr
