"""A teacher split over devices by `runtime.device_map` gives the cache one device gives.

Without a GPU the split is over the CPU and accelerate's disk offload: the offloaded layers run
through the same device hooks that move them between GPUs, and their weights sit on `meta`, which
is what a split run must see through. The reference is `tiny_cache`, the same data extracted with
the teacher whole on one device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pkt_pipeline.cache import open_cache, verify_cache
from pkt_pipeline.config import ConfigError, load_config
from pkt_pipeline.extraction import weights_sha256
from pkt_pipeline.models import ModelLoadError, input_device, load_model
from stages import evaluate, extract
from tiny_data import extract_config

# Every other block offloaded, the embedding and the head among them: the first parameter is then
# on `meta`, so inputs must go where the model's own hook sends them.
ALTERNATING = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
               "lm_head": "disk"}
# accelerate's own plan under a memory cap below the model's ~0.8 MB: the embedding and layer 0 fit.
PLANNED = ("auto", {"cpu": "450KB"})
# bf16 storage: one rounding of an equal float32 value (the split and whole runs are exact on one CPU).
BF16 = dict(rtol=2 ** -7, atol=1e-5)


def placement(device_map, max_memory, folder: Path) -> list[str]:
    flow = json.dumps(device_map)
    overrides = [f"runtime.device_map={flow}", f"runtime.offload_folder={folder}"]
    return overrides + ([f"runtime.max_memory={json.dumps(max_memory)}"] if max_memory else [])


@pytest.mark.parametrize("device_map, max_memory", [(ALTERNATING, None), PLANNED], ids=["dict", "auto-max-memory"])
def test_split_teacher_cache_equals_the_single_device_cache(tiny_pair, tiny_dataset, tiny_cache, tmp_path,
                                                           device_map, max_memory):
    out = tmp_path / "cache"
    config = extract_config(tiny_pair["teacher"], tiny_dataset, out, "extract.capture=[hidden, delta]",
                            *placement(device_map, max_memory, tmp_path / "offload"))
    summary = extract.run(config, progress=False)
    assert {"cpu", "disk"} <= set(summary["device_map"].values()), summary["device_map"]
    assert verify_cache(out) == []

    split, whole = open_cache(out), open_cache(tiny_cache)
    assert split.manifest.teacher == whole.manifest.teacher  # the weights' hash reads the offloaded blocks back
    ids = whole.index.column("example_id").to_pylist()
    assert split.index.column("example_id").to_pylist() == ids
    for example_id in ids:
        assert np.array_equal(split.tokens(example_id), whole.tokens(example_id))
        for layer in whole.layers:
            torch.testing.assert_close(split.hidden(layer, example_id), whole.hidden(layer, example_id), **BF16)
            if layer:
                torch.testing.assert_close(split.delta(layer, example_id), whole.delta(layer, example_id), **BF16)
        split_values, split_ids = split.topk(example_id)
        whole_values, whole_ids = whole.topk(example_id)
        assert torch.equal(split_ids, whole_ids)
        torch.testing.assert_close(split_values, whole_values, rtol=1e-5, atol=1e-5)
    for target in ("output", "contribution"):
        np.testing.assert_allclose(split.attribution(target), whole.attribution(target), rtol=1e-5)
    split_head, whole_head = split.teacher_head(), whole.teacher_head()
    for key in ("lm_head", "final_norm"):
        assert torch.equal(torch.as_tensor(split_head[key]), torch.as_tensor(whole_head[key])), key


def test_a_split_model_is_read_through_its_hooks(tiny_pair, tmp_path):
    whole = load_model(tiny_pair["teacher"], dtype="float32")
    split = load_model(tiny_pair["teacher"], dtype="float32", device_map=ALTERNATING, offload_folder=str(tmp_path))
    assert next(split.parameters()).device.type == "meta" and input_device(split) == torch.device("cpu")
    assert weights_sha256(split) == weights_sha256(whole)


def test_pkt_eval_of_a_split_model_scores_as_the_whole_one(tiny_pair, tiny_dataset, tmp_path):
    def scored(name: str, *overrides: str) -> list[dict]:
        out = tmp_path / name
        config = load_config(overrides=[f"eval.model={tiny_pair['teacher']}", "eval.tasks=[dev]",
                                        f"eval.dev_data=[{tiny_dataset}]", "eval.limit=4", f"eval.out={out}",
                                        "runtime.dtype=float32", *overrides])
        evaluate.run(config, progress=False, echo=lambda line: None)
        return [json.loads(line) for line in (out / "items" / "dev.jsonl").read_text().splitlines()]

    whole = scored("whole")
    split = scored("split", *placement(ALTERNATING, None, tmp_path / "offload"))
    assert [r["id"] for r in split] == [r["id"] for r in whole] and len(whole) == 4
    for a, b in zip(split, whole):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


@pytest.mark.parametrize("override, message", [
    ("runtime.device_map=everywhere",
     "runtime.device_map must be empty (one device), one of ['auto', 'balanced', 'balanced_low_0', 'sequential'] "
     "or a mapping {module: device}, got 'everywhere'"),
    ("runtime.device_map={lm_head: gpu7}",
     "runtime.device_map.lm_head must be a GPU index (0, 1, ...), a device (cuda:1, cpu) or disk, got 'gpu7'"),
    ("runtime.device_map={}", "runtime.device_map is an empty mapping"),
    ("runtime.max_memory={gpu0: 1GB}", "runtime.max_memory.gpu0 is no device: the keys are GPU indices"),
    ("runtime.max_memory={cpu: lots}",
     "runtime.max_memory.cpu must be a size such as 70GiB or 500MB, or a number of bytes, got 'lots'"),
    ("runtime.max_memory={cpu: 1GB}", "runtime.max_memory applies only with runtime.device_map"),
])
def test_a_bad_placement_is_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    assert message in str(caught.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map={"model": "cpu", "lm_hed": "cpu"}),
     "runtime.device_map.lm_hed: {teacher} has no module 'lm_hed'; did you mean 'lm_head'?"),
    (dict(device_map={"model": "cpu"}), "runtime.device_map places no device for lm_head of {teacher}"),
    (dict(device_map={"": 1}), "runtime.device_map / runtime.max_memory name GPU 1, but this torch sees"),
    (dict(device_map="auto", device="cpu"), "runtime.device='cpu' and runtime.device_map=auto both place the model"),
])
def test_a_placement_the_model_or_machine_lacks_is_refused_before_loading(tiny_pair, kwargs, message):
    if "GPU 1" in message and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a second GPU")
    with pytest.raises(ModelLoadError) as caught:
        load_model(tiny_pair["teacher"], dtype="float32", **kwargs)
    assert message.format(teacher=tiny_pair["teacher"]) in str(caught.value)


def test_extract_refuses_a_split_teacher_with_data_parallel_ranks_or_extras(tiny_pair, tiny_dataset, tmp_path):
    config = extract_config(tiny_pair["teacher"], tiny_dataset, tmp_path / "c", "runtime.device_map=auto")
    with pytest.raises(ValueError, match=r"does not combine with a data-parallel launch \(WORLD_SIZE=2\)"):
        extract.check_placement(config, world=2)
    config = extract_config(tiny_pair["teacher"], tiny_dataset, tmp_path / "c", "runtime.device_map=auto",
                            "extract.extras=[laten]")
    with pytest.raises(ValueError, match=r"extract.extras \(laten\) read the teacher on one device"):
        extract.run(config, progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists()
