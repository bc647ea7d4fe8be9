"""One resolver for every data setting (`pkt_pipeline.datasets.resolve_data`): `extract.data`, the
attribution data and LaTen's splits name their files the same way and fail with the same error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pkt_pipeline.datasets import DatasetNotFound, resolve_data


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Path:
    """A team's shared data folder holding gsm's transfer splits, and an empty local data folder."""
    root = tmp_path / "shared"
    (root / "transfer-splits" / "gsm").mkdir(parents=True)
    for split in ("train", "align"):
        (root / "transfer-splits" / "gsm" / f"{split}.jsonl").write_text("{}\n")
    monkeypatch.setenv("PKT_SHARED_DATA", str(root))
    (tmp_path / "data").mkdir()
    return root


def test_a_file_or_a_task_split_resolves_alike_for_every_setting(shared, tmp_path):
    train = shared / "transfer-splits" / "gsm" / "train.jsonl"
    assert resolve_data(str(train)) == train
    assert resolve_data("gsm/train", tmp_path / "data") == train
    assert resolve_data("gsm/align", tmp_path / "data", beside=train, default_name="extract.jsonl",
                        setting="extract.laten.align_data") == train.with_name("align.jsonl")


def test_an_empty_reference_means_the_named_split_beside_the_data(shared, tmp_path):
    train = shared / "transfer-splits" / "gsm" / "train.jsonl"
    assert resolve_data("", tmp_path / "data", beside=train, default_name="align.jsonl") == train.with_name("align.jsonl")
    message = (f"extract.laten.extract_data defaults to the task's extract split, but there is no extract.jsonl "
               f"beside {train}; set extract.laten.extract_data")
    with pytest.raises(DatasetNotFound, match=re.escape(message)):
        resolve_data("", tmp_path / "data", beside=train, default_name="extract.jsonl",
                     setting="extract.laten.extract_data")
    with pytest.raises(DatasetNotFound, match="no data set given for extract.data"):
        resolve_data("", tmp_path / "data", setting="extract.data")


def test_what_is_not_found_is_named_with_its_setting(shared, tmp_path):
    with pytest.raises(DatasetNotFound, match=re.escape("dataset not found (extract.laten.inject_data): nope.jsonl")):
        resolve_data("nope.jsonl", tmp_path / "data", setting="extract.laten.inject_data")
    with pytest.raises(DatasetNotFound, match=re.escape("dataset not found: a/b/c (give a .jsonl file or TASK/SPLIT")):
        resolve_data("a/b/c", tmp_path / "data")
    with pytest.raises(DatasetNotFound, match="transfer split gsm/test is not reachable. Tried: "):
        resolve_data("gsm/test", tmp_path / "data")
