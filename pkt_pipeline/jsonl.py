"""Reading jsonl files: every data file, item record and benchmark pkt reads goes through here, so a
bad line is always reported as `file:line` rather than as a bare codec or JSON error."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file (gzip-compressed when it ends in .gz),
    split at "\\n" only (a JSON string may hold U+2028, where `splitlines` would cut). Bytes that are not
    UTF-8 are reported with the file and line, not as a bare codec error."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (byte {raw[exc.start]:#04x} at position "
                                 f"{exc.start + 1} of the line); save the file as UTF-8") from None
            if line.strip():
                yield line_number, line


def jsonl_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of `path` (see `jsonl_lines`); a line that is not
    JSON is reported with its file and line number."""
    for line_number, line in jsonl_lines(path):
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
