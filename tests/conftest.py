"""Shared fixtures: the tiny teacher/student pair, built once per test session, no download."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from pkt_pipeline.tiny_models import save_tiny_pair

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """`{"teacher": dir, "student": dir}`: Qwen2 4x64 and 2x32 sharing one tokenizer."""
    return save_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_teacher_gguf(tiny_pair, tmp_path_factory) -> Path:
    """The tiny teacher as a Q8_0 GGUF file, read by the same loader as the real models."""
    from gguf_export import export_qwen2_gguf

    return export_qwen2_gguf(tiny_pair["teacher"], tmp_path_factory.mktemp("gguf") / "tiny-teacher.Q8_0.gguf")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """`train.jsonl` of 24 synthetic chat examples, with a 3-example `extract.jsonl` beside it."""
    from tiny_data import write_dataset

    folder = tmp_path_factory.mktemp("data")
    write_dataset(folder / "extract.jsonl", 3, seed=1)
    return write_dataset(folder / "train.jsonl", 24)


@pytest.fixture(scope="session")
def tiny_cache(tiny_pair, tiny_dataset, tmp_path_factory) -> Path:
    """A finished cache of the tiny teacher over `tiny_dataset`: every layer's hidden states and
    deltas, top-k, several groups (shards of 128 tokens); float32 forward, bf16 storage."""
    from stages import extract
    from tiny_data import extract_config

    out = tmp_path_factory.mktemp("cache") / "tiny"
    extract.run(extract_config(tiny_pair["teacher"], tiny_dataset, out, "extract.capture=[hidden, delta]"), progress=False)
    return out


@pytest.fixture
def code_sandbox() -> str:
    """The code sandbox's mode on this machine. Where it cannot be built (no `unshare`, namespaces
    forbidden) the test is skipped, saying why: pkt itself refuses to run model-written code there."""
    from pkt_pipeline.evaluation.sandbox import SandboxUnavailable, sandbox_mode

    try:
        return sandbox_mode()
    except SandboxUnavailable as exc:
        pytest.skip(f"this machine cannot build the code sandbox: {exc}")


def missing_data(reason: str) -> NoReturn:
    """Skip a test whose data (../shared, data/) this machine lacks, saying why. Under `CI=true` fail instead:
    CI has the data, and a skip there would hide a test that never runs."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: a test that needs ../shared data fails there instead of skipping, so it "
                    "cannot silently never run)", pytrace=False)
    pytest.skip(reason)


def require_file(path: Path) -> Path:
    """`path`, or `missing_data` naming it."""
    if not path.is_file():
        missing_data(f"{path} is absent")
    return path


def require_dataset(name: str) -> Path:
    """A data set found on this machine (data/ or the shared data folder; never the hub), or `missing_data`."""
    from pkt_pipeline.datasets import DatasetNotFound, find_dataset

    try:
        return find_dataset(name, allow_hub=False)
    except DatasetNotFound as exc:
        missing_data(str(exc))


def real_model_dir(name: str) -> Path:
    """A converted pinned model, or a skip saying how to get it."""
    path = PROJECT_ROOT / "models" / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is absent: run `pkt assets fetch` first")
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """The endpoint URL of a real S3 server process (moto's `moto_server`) on 127.0.0.1, stopped at the end.

    pkt, s3fs and DVC find it the way a user's tools find theirs, through the environment
    (`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, ...), set here for this session and its
    subprocesses; the user's own AWS config files are hidden. A server that cannot start fails
    the test, naming why: an S3 test that skips would never run.
    """
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if binary is None:
        pytest.fail("moto_server is not installed: `pip install -e .[test] -c requirements/constraints.txt` installs "
                    "moto[server], the S3 server the S3 tests run against", pytrace=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("s3") / "moto_server.log"
    with open(log, "wb") as handle:
        server = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120  # a loaded machine imports moto slowly
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5).close()
                break
            except (urllib.error.URLError, OSError) as error:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the S3 server ({binary} on {endpoint}) did not start ({error}): "
                                f"{log.read_text(errors='replace')[-2000:]}", pytrace=False)
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as env:
            hidden = tmp_path_factory.mktemp("aws")
            for name, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "pkt-test",
                                "AWS_SECRET_ACCESS_KEY": "pkt-test", "AWS_DEFAULT_REGION": "us-east-1",
                                "AWS_CONFIG_FILE": str(hidden / "config"),
                                "AWS_SHARED_CREDENTIALS_FILE": str(hidden / "credentials")}.items():
                env.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
                env.delenv(name, raising=False)
            yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    """`s3://NAME`: a bucket on the test S3 server, new for this session (tests write under their own prefixes)."""
    import fsspec

    name = f"pkt-test-{time.time_ns()}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"
