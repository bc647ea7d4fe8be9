"""Find the evaluation and transfer data sets wherever this machine has them.

Each data set is looked for, in order: in the data directory that `pkt assets fetch` fills
(`data/`), in a team's shared data folder (`$PKT_SHARED_DATA`, or `../shared/data` beside
the project), and finally on the Hugging Face hub when it has a public copy there, which is
converted to the same jsonl layout. When none is reachable the error lists every place tried.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DatasetNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    relpath: str  # file or folder, relative to a data root
    hub_id: str | None = None
    hub_files: tuple[tuple[str, str], ...] = ()  # (parquet file in the hub repo, jsonl file written)


DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec("mmlu", "mmlu/test.jsonl"),
        DatasetSpec("humaneval", "humaneval/HumanEval.jsonl.gz"),
        DatasetSpec(
            "gsm8k", "gsm8k", "openai/gsm8k",
            (("main/train-00000-of-00001.parquet", "train.jsonl"), ("main/test-00000-of-00001.parquet", "test.jsonl")),
        ),
        DatasetSpec(
            "mbpp", "mbpp/mbpp.jsonl", "google-research-datasets/mbpp",
            tuple((f"full/{split}-00000-of-00001.parquet", "mbpp.jsonl") for split in ("prompt", "test", "validation", "train")),
        ),
        DatasetSpec("transfer-splits", "transfer-splits"),
    )
}


def shared_data_roots() -> list[Path]:
    """Candidate shared data folders, most specific first."""
    roots = []
    if os.environ.get("PKT_SHARED_DATA"):
        roots.append(Path(os.environ["PKT_SHARED_DATA"]))
    roots += [Path.cwd().parent / "shared" / "data", PROJECT_ROOT.parent / "shared" / "data"]
    unique = []
    for root in roots:
        if root.resolve() not in [u.resolve() for u in unique]:
            unique.append(root)
    return unique


def find_dataset(name: str, data_dir: str | Path = "data", allow_hub: bool = True) -> Path:
    """Path of data set `name` (a file or a folder), fetching it from the hub as a last resort."""
    if name not in DATASETS:
        raise DatasetNotFound(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    tried = []
    for root in [Path(data_dir), *shared_data_roots()]:
        candidate = root / spec.relpath
        if candidate.exists():
            return candidate
        tried.append(str(candidate))
    if spec.hub_id and allow_hub:
        try:
            return _fetch_from_hub(spec, Path(data_dir))
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes the same clear message
            tried.append(f"hub dataset {spec.hub_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    elif spec.hub_id:
        tried.append(f"hub dataset {spec.hub_id} (not tried)")
    else:
        tried.append("no public hub copy exists")
    hint = " Set PKT_SHARED_DATA to a folder that holds it." if not spec.hub_id else ""
    raise DatasetNotFound(f"data set {name!r} is not reachable. Tried: " + "; ".join(tried) + "." + hint)


def find_transfer_split(task: str, split: str, data_dir: str | Path = "data") -> Path:
    """`transfer-splits/<task>/<split>.jsonl` from the first data root that has it.

    Looked up per file, not per folder: `data/` may hold only splits carved here (MMLU) while
    the team's shared folder holds the others."""
    tried = []
    for root in [Path(data_dir), *shared_data_roots()]:
        candidate = root / "transfer-splits" / task / f"{split}.jsonl"
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise DatasetNotFound(f"transfer split {task}/{split} is not reachable. Tried: {'; '.join(tried)}. "
                          "Set PKT_SHARED_DATA to a folder that holds transfer-splits/.")


def resolve_data(reference: str, data_dir: str | Path = "data", beside: Path | None = None,
                 default_name: str = "", setting: str = "") -> Path:
    """The data file a setting names: a jsonl path as given, or TASK/SPLIT of the transfer splits
    (e.g. `gsm/train`); an empty reference means `default_name` in the folder of `beside` (a
    task's other split next to the data being cached), and `setting` is the key to name then.

    Every data setting resolves through here (`extract.data`, LaTen's `extract_data`, ...), so a
    reference means the same wherever it is written. Raises DatasetNotFound.
    """
    if not reference:
        if beside is None or not default_name:
            raise DatasetNotFound(f"no data set given{f' for {setting}' if setting else ''}")
        path = beside.with_name(default_name)
        if not path.is_file():
            split = default_name.removesuffix(".jsonl")
            raise DatasetNotFound(f"{setting or 'this step'} defaults to the task's {split} split, but there is no "
                                  f"{default_name} beside {beside}; set {setting or 'a data file'}")
        return path
    path = Path(reference)
    if path.is_file():
        return path
    parts = reference.split("/")
    if path.suffix == ".jsonl" or path.exists() or len(parts) != 2:
        where = f" ({setting})" if setting else ""
        hint = "" if path.suffix == ".jsonl" else " (give a .jsonl file or TASK/SPLIT, e.g. gsm/train)"
        raise DatasetNotFound(f"dataset not found{where}: {reference}{hint}")
    return find_transfer_split(parts[0], parts[1], data_dir)


def transfer_split_files(data_dir: str | Path = "data") -> list[Path]:
    """Every reachable transfer split file, one per task/split (the first root wins, as above)."""
    found: dict[str, Path] = {}
    for root in [Path(data_dir), *shared_data_roots()]:
        for path in sorted((root / "transfer-splits").glob("*/*.jsonl")):
            found.setdefault(f"{path.parent.name}/{path.name}", path)
    return [found[key] for key in sorted(found)]


@functools.cache
def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached, or None when it may be; asked once per process.

    Without this, each file's download retries for half a minute before failing on a machine
    with no network. A proxy may resolve names we cannot, so with one configured we just try.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    return None


def _fetch_from_hub(spec: DatasetSpec, data_dir: Path) -> Path:
    """Download the hub's parquet files and write them as the jsonl files pkt reads."""
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    reason = hub_unreachable_reason()
    if reason:
        raise ConnectionError(reason)

    target = data_dir / spec.relpath
    folder = target if not target.suffix else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    rows_by_file: dict[str, list[dict]] = {}
    for remote, local in spec.hub_files:
        parquet = hf_hub_download(spec.hub_id, remote, repo_type="dataset")
        rows_by_file.setdefault(local, []).extend(pq.read_table(parquet).to_pylist())
    for local, rows in rows_by_file.items():
        partial = folder / (local + ".partial")
        with open(partial, "w") as sink:
            for row in rows:
                sink.write(json.dumps(row) + "\n")
        os.replace(partial, folder / local)
    return target
