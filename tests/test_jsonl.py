"""The one jsonl reader: rows with their line numbers, and a bad line named by file and line."""

from __future__ import annotations

import gzip

import pytest

from pkt_pipeline.evaluation.code_tasks import load_humaneval
from pkt_pipeline.evaluation.gsm8k import load_gsm8k
from pkt_pipeline.evaluation.mmlu import load_mmlu
from pkt_pipeline.jsonl import jsonl_lines, jsonl_records


def test_records_keep_line_numbers_skip_blank_lines_and_do_not_cut_at_u2028(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": "x\u2028y"}\n', encoding="utf-8")
    assert list(jsonl_records(path)) == [(1, {"a": 1}), (4, {"b": "x\u2028y"})]


def test_gzip_files_read_like_plain_ones(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('{"a": 1}\n{"a": 2}\n')
    assert [row for _, row in jsonl_records(path)] == [{"a": 1}, {"a": 2}]


def test_a_bad_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON \(Expecting value\)$"):
        list(jsonl_records(path))
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not UTF-8 text \(byte 0xff at position 8 of the line\)"):
        list(jsonl_lines(path))


@pytest.mark.parametrize("load", [load_gsm8k, load_mmlu, load_humaneval], ids=["gsm8k", "mmlu", "humaneval"])
def test_benchmark_loaders_name_the_bad_line(tmp_path, load):
    path = tmp_path / "bench.jsonl"
    path.write_text("\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON"):
        load(path)
