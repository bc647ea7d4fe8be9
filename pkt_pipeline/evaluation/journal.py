"""A journal of finished item records, so a killed `pkt eval` resumes instead of starting over.

On a CPU one model's evaluation runs for an hour or more (the teacher's 1000 MMLU questions); a
kill, a reboot or Ctrl-C must not throw that away. Items are scored in chunks and every finished
chunk is appended (and flushed to disk) to `OUT/.journal/<task>.jsonl`; a rerun with the same
model and scoring settings reads it back and scores only the rest. The journal's first line is a
fingerprint of what the records depend on; a journal of another model or other settings is
discarded. It sits beside the outputs (not in `items/`), so DVC, which clears a stage's outputs
before rerunning it, leaves it alone; it is deleted once the task's records are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

CHUNK_ITEMS = 64
"""Items scored between two journal writes: at most this many items' work is lost to a kill."""


def model_fingerprint(model_name: str) -> dict:
    """What identifies a model's weights cheaply: for a local path, each file's name, size and mtime
    (a retrained model at the same path differs); for a hub id, the id."""
    path = Path(model_name)
    if not path.exists():
        return {"model": model_name}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"model": str(path.resolve()),
            "files": [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
                      for p in files]}


class Journal:
    """Records of one task, by phase (e.g. "nll", "generate") and item id."""

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self.records: dict[str, dict[str, dict]] = {}
        header = json.dumps({"fingerprint": fingerprint}, sort_keys=True)
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            if lines and lines[0] == header:
                for line in lines[1:]:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by the kill: everything before it holds
                        break
                    self.records.setdefault(entry["phase"], {})[entry["id"]] = entry["record"]
            else:
                self.path.unlink()
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(header + "\n")

    def resumed(self) -> int:
        return sum(len(records) for records in self.records.values())

    def add(self, phase: str, ids: Iterable[str], records: Iterable[dict]) -> None:
        with self.path.open("a") as handle:
            for item_id, record in zip(ids, records):
                handle.write(json.dumps({"phase": phase, "id": item_id, "record": record}) + "\n")
                self.records.setdefault(phase, {})[item_id] = record
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()

    def score(self, phase: str, items: list, id_of: Callable[[object], str],
              score: Callable[[list], list[dict]]) -> list[dict]:
        """`score(chunk)` over the items not yet journalled, a chunk at a time (the scorer shows its own
        progress per chunk); every item's record, in order."""
        done = self.records.get(phase, {})
        todo = [item for item in items if id_of(item) not in done]
        for start in range(0, len(todo), CHUNK_ITEMS):
            chunk = todo[start:start + CHUNK_ITEMS]
            self.add(phase, [id_of(item) for item in chunk], score(chunk))
        done = self.records.get(phase, {})
        return [done[id_of(item)] for item in items]
