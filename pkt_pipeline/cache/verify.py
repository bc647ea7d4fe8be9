"""`pkt cache verify` and `pkt cache info`: is a cache whole, and what does it hold."""

from __future__ import annotations

import os

from .layout import LEDGER_DIR, MANIFEST_FILE, RUN_FILE, CacheError, ledger_key
from .store import CacheFiles


def verify_cache(path: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """Every problem found, each naming the file; an empty list means the cache is whole.

    A finished cache is checked against its manifest's checksums. An unfinished one (no
    manifest yet) is checked against its ledger, which says which groups are done and safe.
    """
    files = CacheFiles(path, storage_options)
    if not files.exists(RUN_FILE):
        return [f"{files.url}: not a pkt cache ({RUN_FILE} missing)"]
    problems = []
    if files.exists(MANIFEST_FILE):
        expected = files.read_json(MANIFEST_FILE)["checksums"]
    else:
        run = files.read_json(RUN_FILE)
        problems.append(f"{MANIFEST_FILE} missing: the extraction did not finish; rerun it to resume")
        expected = {}
        for group in range(run["layout"]["groups"]):
            if files.exists(ledger_key(group)):
                expected.update(files.read_json(ledger_key(group))["files"])
    for key, checksum in sorted(expected.items()):
        actual = files.sha256(key)
        if checksum is None:
            continue
        if actual is None:
            problems.append(f"missing file: {key}")
        elif actual != checksum:
            problems.append(f"checksum mismatch: {key} (expected {checksum[:16]}…, found {actual[:16]}…)")
    return problems


def cache_info(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """A human-oriented summary of a finished cache."""
    files = CacheFiles(path, storage_options)
    if not files.exists(MANIFEST_FILE):
        raise CacheError(f"{files.url} has no {MANIFEST_FILE}: not a finished pkt cache")
    manifest = files.read_json(MANIFEST_FILE)
    counts, capture = manifest["counts"], manifest["capture"]
    width = manifest["teacher"]["hidden_size"]
    layers = capture["layers"]
    float_rows = len(layers) * ("hidden" in capture["kinds"]) + sum(l >= 1 for l in layers) * ("delta" in capture["kinds"])
    raw_per_token = float_rows * width * 2 + capture["top_k"] * 8 + 4 + 1  # + top-k values/ids, token id, mask
    sizes = {key: files.size(key) for key, checksum in manifest["checksums"].items() if checksum is not None}
    stored = sum(sizes.values())
    teacher_bytes = sum(size for key, size in sizes.items() if key.startswith("teacher/"))
    token_major = ("hidden/", "delta/", "topk/", "tokens/", "supervised/", "answer/")
    activation_bytes = sum(size for key, size in sizes.items() if key.startswith(token_major))
    return {
        "path": files.url,
        "teacher": manifest["teacher"]["id"],
        "examples": counts["examples"],
        "tokens": counts["tokens"],
        "supervised_tokens": counts["supervised_tokens"],
        "truncated": counts["truncated"],
        "layers": capture["layers"],
        "kinds": capture["kinds"],
        "top_k": capture["top_k"],
        "storage_dtype": capture["storage_dtype"],
        "compressor": f"{capture['compressor']}-{capture['compression_level']}",
        "stored_bytes": stored,
        "activation_bytes": activation_bytes,
        "teacher_weight_bytes": teacher_bytes,
        "extras": {name: sum(size for key, size in sizes.items() if key.startswith(f"extras/{name}/"))
                   for name in manifest.get("extras", {})},
        "bytes_per_token": activation_bytes / max(counts["tokens"], 1),
        "compression_ratio": raw_per_token * counts["tokens"] / max(activation_bytes, 1),
        "groups": manifest["layout"]["groups"],
        "ledger_entries": len(files.listdir(LEDGER_DIR)),
    }
