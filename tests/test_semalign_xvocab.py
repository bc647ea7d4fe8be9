"""`semalign-xvocab`: the shared-string vocabulary against a hand count from the tokenizers' files, the map with
teacher = student against plain SemAlign's, and the whole pipeline (`pkt extract` + `pkt align --method
semalign-xvocab`) with a student of another tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pkt_pipeline.cache import CacheError, open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.methods import AlignContext, get_method, resolve
from pkt_pipeline.methods.semalign.semantic_map import semantic_map
from pkt_pipeline.models import load_model, load_tokenizer
from pkt_pipeline.tiny_models import save_tiny_cross_student
from stages import align
from test_uld import FAST, extract_then_align

METHOD = "semalign-xvocab"


@pytest.fixture(scope="module")
def cross_student(tmp_path_factory):
    return save_tiny_cross_student(tmp_path_factory.mktemp("cross") / "student")


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the table byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def hand_strings(folder) -> dict[str, int]:
    """{string: id} from `tokenizer.json` by hand: each vocabulary entry's bytes, strictly UTF-8 decoded, and each
    added token's content (special tokens are in both lists); strings that are no whole characters or belong to two ids are left out."""
    data = json.loads((folder / "tokenizer.json").read_text())
    table = byte_decoder()
    owners: dict[str, set[int]] = {}
    entries = [(bytes(table[c] for c in token), token_id) for token, token_id in data["model"]["vocab"].items()]
    entries += [(added["content"].encode(), added["id"]) for added in data["added_tokens"]]
    for raw, token_id in entries:
        try:
            owners.setdefault(raw.decode("utf-8"), set()).add(token_id)
        except UnicodeDecodeError:
            continue
    return {text: min(ids) for text, ids in owners.items() if len(ids) == 1 and text}


def method_on(cache_dir, student_dir, tmp_path, *settings):
    config = load_config(overrides=[f"student={student_dir}", f"align.cache={cache_dir}", f"align.out={tmp_path}",
                                    f"align.method={METHOD}", f"methods.{METHOD}.pairing=proportional", *settings,
                                    *FAST])
    resolved = resolve(config, METHOD)
    return get_method(METHOD)(AlignContext(open_cache(cache_dir), resolved.align, load_tokenizer(str(student_dir)),
                                           settings=resolved.settings))


def test_the_shared_vocabulary_of_the_tiny_cross_pair_is_the_hand_count(tiny_pair, tiny_cache, cross_student,
                                                                        tmp_path):
    teacher, student = hand_strings(tiny_pair["teacher"]), hand_strings(cross_student)
    shared = sorted(teacher.keys() & student.keys())
    assert 0 < len(shared) < 320
    method = method_on(tiny_cache, cross_student, tmp_path)
    method.setup(load_model(str(cross_student), dtype="float32", device="cpu"))
    vocabulary = method.vocabulary
    assert len(vocabulary) == len(shared)
    assert sorted(zip(vocabulary.student_ids.tolist(), vocabulary.teacher_ids.tolist())) == sorted(
        (student[text], teacher[text]) for text in shared)
    assert method.run_metrics() == {"shared_vocabulary": {
        "shared_tokens": len(shared), "teacher_vocab": 384, "student_vocab": 320,
        "teacher_share": round(len(shared) / 384, 6), "student_share": round(len(shared) / 320, 6)}}
    assert method.semantic_map.matrix.shape == (32, 64)
    assert method.format_report(method.report(None, None, "before", None))[0].startswith(
        f"shared-string vocabulary: {len(shared)} tokens, ")


@pytest.mark.parametrize("recompose", ["lstsq", "transpose"])
def test_with_teacher_equal_student_the_map_is_semaligns_on_the_shared_rows(tiny_pair, tiny_cache, tmp_path,
                                                                           recompose):
    """The tiny teacher as its own student: every token whose string is its own is shared, with itself; the map is
    plain SemAlign's on those rows, and under lstsq both it and plain SemAlign's whole-vocabulary map are I."""
    teacher_dir = tiny_pair["teacher"]
    model = load_model(str(teacher_dir), dtype="float32", device="cpu")
    method = method_on(tiny_cache, teacher_dir, tmp_path, f"methods.{METHOD}.recompose={recompose}")
    method.setup(model)
    own = hand_strings(teacher_dir)
    ids = method.vocabulary.teacher_ids
    np.testing.assert_array_equal(ids, method.vocabulary.student_ids)
    assert sorted(ids.tolist()) == sorted(own.values())
    head = model.get_output_embeddings().weight.detach()
    rows = torch.from_numpy(ids)
    expected = semantic_map(open_cache(tiny_cache).teacher_head()["lm_head"][rows], head[rows], len(ids), recompose)
    torch.testing.assert_close(method.semantic_map.matrix, expected, rtol=1e-4, atol=1e-5)
    config = load_config(overrides=[f"student={teacher_dir}", f"align.cache={tiny_cache}", f"align.out={tmp_path}",
                                    "methods.semalign.pairing=proportional", f"methods.semalign.recompose={recompose}",
                                    *FAST])
    resolved = resolve(config, "semalign")
    plain = get_method("semalign")(AlignContext(open_cache(tiny_cache), resolved.align,
                                                load_tokenizer(str(teacher_dir)), settings=resolved.settings))
    plain.setup(model)
    if recompose == "lstsq":
        eye = torch.eye(64)
        torch.testing.assert_close(plain.semantic_map.matrix, eye, rtol=0, atol=2e-3)
        torch.testing.assert_close(method.semantic_map.matrix, plain.semantic_map.matrix, rtol=0, atol=2e-3)


@pytest.mark.integration
def test_pkt_extract_then_pkt_align_semalign_xvocab_trains_a_student_with_another_tokenizer(
        tiny_pair, tiny_dataset, cross_student, tmp_path):
    out, log, done = extract_then_align(tiny_pair, tiny_dataset, cross_student, tmp_path, METHOD, "align.steps=4",
                                        "align.micro_batch_size=2", flags=("--report-map",))
    assert len(log) == 4 and all(entry["layer"] > 0 and entry["chunks"] > 0 for entry in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == METHOD and metrics["steps"] == 4 and set(metrics["pairs"]) == {"1", "2"}
    shared = len(hand_strings(tiny_pair["teacher"]).keys() & hand_strings(cross_student).keys())
    assert metrics["shared_vocabulary"]["shared_tokens"] == shared
    assert json.loads((out / "vocabulary_report.json").read_text())["shared_vocabulary"] == metrics["shared_vocabulary"]
    assert f"shared-string vocabulary: {shared} tokens" in done.stdout
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").config.vocab_size == 320


def test_a_cache_from_before_the_cross_tokenizer_record_is_refused_for_semalign_xvocab(tiny_cache, cross_student,
                                                                                       tmp_path):
    old = tmp_path / "old-cache"
    shutil.copytree(tiny_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["cross_tokenizer"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    config = load_config(overrides=[f"student={cross_student}", f"align.cache={old}",
                                    f"align.out={tmp_path / 'out'}", f"align.method={METHOD}", *FAST])
    with pytest.raises(CacheError) as error:
        align.run(config, progress=False)
    assert str(error.value).startswith(f"method {METHOD} needs ")
    assert str(old) in str(error.value) and "pkt extract --overwrite" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_settings_that_do_not_apply_across_tokenizers_are_refused(tiny_cache, cross_student, tmp_path):
    with pytest.raises(ValueError, match=f"methods.{METHOD}.objective=v1: only the v2 objective"):
        method_on(tiny_cache, cross_student, tmp_path, f"methods.{METHOD}.objective=v1")
    with pytest.raises(ValueError, match=f"methods.{METHOD}.kl_mode and kl_temperature have no effect"):
        method_on(tiny_cache, cross_student, tmp_path, f"methods.{METHOD}.kl_temperature=2.0")


def test_the_loss_on_one_batch_is_the_relation_loss_at_aligned_pairs_plus_alms_chunk_term(tiny_cache, cross_student,
                                                                                          tmp_path):
    """The layer term against plain per-example forwards of the real tiny student, gathered at the aligned pairs by
    hand; the output term against `alm` itself on the same batch."""
    from transformers import AutoModelForCausalLM

    from pkt_pipeline.loader import CacheLoader
    from pkt_pipeline.losses import relation_loss
    from pkt_pipeline.xtok import align_cache

    model = load_model(str(cross_student), dtype="float32", device="cpu")
    method = method_on(tiny_cache, cross_student, tmp_path, f"methods.{METHOD}.lambda_out=0.5")
    method.setup(model)
    phase = method.phases(4, 2)[0]
    assert phase.student_layer == 1
    cache = open_cache(tiny_cache)
    aligned = align_cache(cache, method.context.tokenizer)
    with CacheLoader(cache, batch_size=4, layers=phase.teacher_layers, kind=method.teacher_kind, topk=False,
                     student=aligned, target_logprob=True) as loader:
        batch = next(iter(loader))
    with torch.no_grad():
        loss, parts = method.loss(model, batch, phase)
    plain = AutoModelForCausalLM.from_pretrained(cross_student, torch_dtype=torch.float32)
    per_example = []
    for row, example_id in enumerate(batch.example_ids):
        own = aligned[example_id]
        with torch.no_grad():
            states = plain(torch.from_numpy(own.input_ids.astype(np.int64))[None], output_hidden_states=True).hidden_states
        delta = (states[1] - states[0])[0]  # [S, D_S]: what student layer 1 added
        teacher = batch.teacher[phase.teacher_layers[0]][row]  # [T, D_T]
        teacher_supervised = cache.supervised(example_id)
        kept = [(t, s) for t, s in own.alignment.pairs.tolist() if teacher_supervised[t] and own.supervised[s]]
        if len(kept) >= 2:
            t, s = map(list, zip(*kept))
            target = method.semantic_map.apply(teacher[t])
            per_example.append(relation_loss(delta[s][None], target[None], torch.ones(1, len(kept), dtype=torch.bool)))
    assert len(per_example) >= 2
    layer = torch.stack(per_example).mean().item()
    assert parts["layer"] == pytest.approx(layer, rel=1e-4, abs=1e-6)
    config = load_config(overrides=[f"student={cross_student}", f"align.cache={tiny_cache}", f"align.out={tmp_path}",
                                    "align.method=alm", *FAST])
    resolved = resolve(config, "alm")
    alm = get_method("alm")(AlignContext(cache, resolved.align, method.context.tokenizer, settings=resolved.settings))
    with torch.no_grad():
        _, alm_parts = alm.loss(model, batch, None)
    assert parts["chunks"] == pytest.approx(alm_parts["alm"], rel=1e-5)
    assert loss.item() == pytest.approx(layer + 0.5 * alm_parts["alm"], rel=1e-4)
    assert method.loss_units(batch, phase) == {"layer": len(per_example), "chunks": alm.loss_units(batch, None)["chunks"]}
