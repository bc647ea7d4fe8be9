"""Stage one, `pkt extract`: run the teacher once over task data and write the activation cache.

Under `torchrun` / `accelerate launch` every rank runs this same function: rank 0 creates the
store, then each rank writes the groups `rank, rank + world, ...` and attributes its share of
the attribution examples (summed across ranks); rank 0 writes the manifest last.

Robustness: a finished group is in the ledger, so a rerun skips it (resume after a crash or
`kill -9`); Ctrl-C finishes the group in flight and stops; a write error (a full disk) stops
with the ledger consistent. The manifest, written last, marks the cache complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pkt_pipeline import __version__
from pkt_pipeline.attribution import TARGETS, accumulate_attribution
from pkt_pipeline.cache import CacheError, CacheWriter, Manifest, WriterLock
from pkt_pipeline.cache.codecs import MAX_PACKED_ID, TOPK_CODECS
from pkt_pipeline.cache.layout import (
    ATTRIBUTION_KEYS,
    FINAL_LAYER_RAW,
    COMPRESSORS,
    LEDGER_DIR,
    MANIFEST_FILE,
    STORAGE_DTYPES,
    TOKENIZER_DIR,
    AttributionSource,
    AttributionSummary,
    Capture,
    CaptureSettings,
    Counts,
    DatasetInfo,
    ExtraEntry,
    Layout,
    Prompt,
    array_specs,
    assign_offsets,
    compressor,
    ledger_key,
    plan_groups,
    run_record,
)
from pkt_pipeline.cache.verify import TOKEN_MAJOR, damaged_files
from pkt_pipeline.config import ExtractConfig, PktConfig
from pkt_pipeline.datasets import DatasetNotFound, resolve_data
from pkt_pipeline.examples import PROMPT_FORMATS, dataset_fingerprint, load_examples
from pkt_pipeline.extraction import (
    CAPTURE_KINDS,
    Interrupted,
    extract_groups,
    final_norm_and_head,
    teacher_info,
    tokenizer_info,
    write_error,
)
from pkt_pipeline.methods import auto_layers, build_extra, check_sections, get_extra
from pkt_pipeline.models import (barrier, distributed_context, load_model, load_model_config, load_tokenizer, peak_rss_gib,
                                 rank_device)

__all__ = ["Interrupted", "estimate", "reopen_damaged_groups", "resolve_attribution_data", "run", "validate"]


def validate(cfg: ExtractConfig) -> None:
    for name in cfg.extras:
        get_extra(name)  # an unknown name fails before the teacher loads
    checks = [
        (cfg.prompt_format in PROMPT_FORMATS, f"extract.prompt_format must be one of {PROMPT_FORMATS}"),
        (set(cfg.capture) <= set(CAPTURE_KINDS) and cfg.capture, f"extract.capture must be a non-empty subset of {CAPTURE_KINDS}"),
        (cfg.storage_dtype in STORAGE_DTYPES, f"extract.storage_dtype must be one of {STORAGE_DTYPES}"),
        (cfg.topk_codec in TOPK_CODECS, f"extract.topk_codec must be one of {TOPK_CODECS}"),
        (cfg.compressor in COMPRESSORS, f"extract.compressor must be one of {COMPRESSORS}"),
        (cfg.top_k >= 1 and cfg.batch_size >= 1 and cfg.max_length >= 2, "extract.top_k, batch_size must be >= 1 and max_length >= 2"),
        (cfg.shard_tokens % cfg.chunk_tokens == 0, "extract.shard_tokens must be a multiple of extract.chunk_tokens"),
        (cfg.max_length <= cfg.shard_tokens, "extract.max_length must not exceed extract.shard_tokens"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_placement(config: PktConfig, world: int) -> None:
    """Refuse a teacher split by `runtime.device_map` where the run could not use it as it is."""
    if not config.runtime.device_map:
        return
    if world > 1:
        raise ValueError(f"runtime.device_map splits one teacher over this machine's devices; it does not combine "
                         f"with a data-parallel launch (WORLD_SIZE={world}): run one process, or leave the map empty")
    if config.extract.extras:
        raise ValueError(f"extract.extras ({', '.join(config.extract.extras)}) read the teacher on one device, not "
                         "split by runtime.device_map: extract with the map first, then add the extras in a run "
                         "without it (a complete cache only gains the extras)")


def run(config: PktConfig, progress: bool = True, echo=print) -> dict:
    """Extract under the cache's writer lock, taken before the teacher loads and released however the run ends.

    Under torchrun rank 0 holds it for all ranks; a second writer is refused, naming the holder.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return _run(config, progress, echo)
    with WriterLock.acquire(config.extract.out):
        return _run(config, progress, echo)


def _run(config: PktConfig, progress: bool = True, echo=print) -> dict:
    cfg = config.extract
    validate(cfg)
    check_sections(config)  # the extras' settings (`methods.<name>.teacher`), and a typo in any method's section
    rank, world = distributed_context()
    check_placement(config, world)
    started = time.perf_counter()
    # a split teacher is placed by accelerate (device stays "auto"); a whole one goes to this rank's device
    device = config.runtime.device if config.runtime.device_map else rank_device(config.runtime.device, world)

    data_path = resolve_data(cfg.data, config.assets.data_dir)
    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.runtime.trust_remote_code)
    prompt = {"format": cfg.prompt_format, "max_length": cfg.max_length, "train_on_inputs": cfg.train_on_inputs}
    examples, counts = load_examples(data_path, tokenizer, cfg.prompt_format, cfg.max_length, cfg.train_on_inputs,
                                     limit=cfg.limit or None)
    model = load_model(config.teacher, dtype=config.runtime.dtype, device=device,
                       trust_remote_code=config.runtime.trust_remote_code, device_map=config.runtime.device_map,
                       max_memory=config.runtime.max_memory, offload_folder=config.runtime.offload_folder)
    layers, layers_rule = capture_layers(config, model.config.num_hidden_layers)
    check_topk_fits(cfg, model.config.vocab_size)
    settings = CaptureSettings(layers, tuple(cfg.capture), cfg.top_k, cfg.storage_dtype, cfg.topk_codec)

    lengths = [len(e.input_ids) for e in examples]
    groups = plan_groups(lengths, cfg.shard_tokens)
    offsets, group_of = assign_offsets(groups, lengths, cfg.shard_tokens)

    attribution_path = resolve_attribution_data(cfg, data_path)
    record = _run_record(config, model, tokenizer, examples, counts, settings, prompt, data_path, attribution_path,
                         len(groups), layers_rule)
    index = pa.table({
        "example_id": [e.example_id for e in examples],
        "content_hash": [e.content_hash for e in examples],
        "offset": pa.array(offsets, pa.int64()),
        "length": pa.array(lengths, pa.int32()),
        "supervised_tokens": pa.array([int(e.supervised.sum()) for e in examples], pa.int32()),
        "group": pa.array(group_of, pa.int32()),
        "truncated": [e.truncated for e in examples],
        "messages": [e.messages for e in examples],  # SOURCE_COLUMNS: what a student with another tokenizer re-renders
        "text": [e.text for e in examples],
    })
    codec = compressor(cfg.compressor, cfg.compression_level)
    writer_args = (cfg.out, record, index, array_specs(settings, model.config.hidden_size), codec)
    repaired: list[int] = []
    if rank == 0:
        writer = CacheWriter.open(*writer_args, overwrite=cfg.overwrite, create=True)
        repaired = reopen_damaged_groups(writer, echo)
    barrier(world)
    if rank != 0:
        writer = CacheWriter.open(*writer_args, create=False)
    timings: dict[str, float] = {}  # the extras' run times: in the summary, never in the manifest (reproducible)
    manifest = Manifest.read(writer.files) if writer.files.exists(MANIFEST_FILE) else None
    kept_extras = dict(manifest.extras) if manifest is not None else {}
    if manifest is not None and len(writer.finished_groups()) == len(groups):
        stale = _stale_extras(cfg.extras, manifest.extras, config)
        missing = [name for name in cfg.extras if name not in manifest.extras or name in stale]
        if not missing:
            echo(f"{cfg.out} is already complete for this teacher, data and settings; nothing to do")
            return {"out": cfg.out, "action": "up to date", "seconds": round(time.perf_counter() - started, 1)}
        if rank == 0:
            for name, changed in stale.items():
                echo(f"{cfg.out}: recomputing the teacher extra {name}: its settings changed ({', '.join(changed)})")
            echo(f"{cfg.out} is complete; adding the teacher extras {', '.join(missing)}")
            extras = {**manifest.extras,
                      **_run_extras(missing, writer, model, tokenizer, config, data_path, codec, progress, timings)}
            manifest = writer.finalize(manifest.attribution, extras)
        return {"out": cfg.out, "action": "extras added", "extras": missing, "stored_bytes": manifest.stored_bytes,
                "extras_seconds": timings, "seconds": round(time.perf_counter() - started, 1)}

    todo = [g for g in range(rank, len(groups), world) if g not in writer.finished_groups()]
    if len(todo) < len(range(rank, len(groups), world)):
        echo(f"resuming {cfg.out}: {len(range(rank, len(groups), world)) - len(todo)} group(s) already written")
    written_tokens = extract_groups(model, writer, examples, groups, offsets, todo, settings, cfg.batch_size,
                                    progress and rank == 0)

    scores, n_used = _attribution(config, tokenizer, model, attribution_path, rank, world, progress and rank == 0)
    summary = {"out": cfg.out, "action": "repaired" if repaired else "extracted", "examples": counts["examples"],
               "tokens": counts["tokens"], "tokens_written_now": written_tokens,
               **({"groups": repaired} if repaired else {}),
               **({"device_map": dict(getattr(model, "hf_device_map", {}))} if config.runtime.device_map else {})}
    try:
        if rank == 0:
            for target, values in scores.items():
                writer.write_array(ATTRIBUTION_KEYS[target], values, chunks=values.shape, codec=None, attributes={
                    "aggregation": cfg.attribution_aggregation, "target": target, "examples": n_used,
                    "data": str(attribution_path)})
            _write_teacher_head(writer, model, settings.storage_dtype, codec)
            _write_tokenizer(writer, tokenizer)
            extras = {**kept_extras, **_run_extras(cfg.extras, writer, model, tokenizer, config, data_path, codec,
                                                   progress, timings)}
        barrier(world)
        if rank == 0:
            manifest = writer.finalize(AttributionSummary(aggregation=cfg.attribution_aggregation, examples=n_used),
                                       extras)
            summary["stored_bytes"] = manifest.stored_bytes
    except DatasetNotFound:
        raise  # an extra's data is missing: nothing failed to write
    except OSError as exc:
        raise write_error(writer, exc) from exc
    summary["extras_seconds"] = timings
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["peak_rss_gib"] = peak_rss_gib()
    if cfg.metrics and rank == 0:
        Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.metrics).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def estimate(config: PktConfig) -> dict:
    """`pkt extract --dry-run`: the cache's size and the run's time, from the teacher's config and tokenizer only.

    Tokens are exact (the data tokenized as the run would); layers follow `extract.layers` (auto included);
    raw bytes are exact for the codec (rows padded to whole chunks, as written); stored bytes apply the
    compressor's ratio measured on the real teacher (bench/cache_fidelity.py), so they are an estimate.
    Time: 2 x parameters x tokens FLOPs of forward, plus 3x that for the attribution examples' forward and
    backward, over the matmul rate measured here on the run's device and dtype: a lower bound."""
    from pkt_pipeline.cache.codecs import bytes_per_token, row_format, stored_ratio
    from pkt_pipeline.models import matmul_rate, parameter_count, resolve_device, resolve_dtype

    cfg = config.extract
    validate(cfg)
    data_path = resolve_data(cfg.data, config.assets.data_dir)
    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.runtime.trust_remote_code)
    examples, counts = load_examples(data_path, tokenizer, cfg.prompt_format, cfg.max_length, cfg.train_on_inputs,
                                     limit=cfg.limit or None)
    attribution, _ = load_examples(resolve_attribution_data(cfg, data_path), tokenizer, cfg.prompt_format,
                                   cfg.max_length, cfg.train_on_inputs, limit=cfg.attribution_examples or None)
    teacher = load_model_config(config.teacher, trust_remote_code=config.runtime.trust_remote_code)
    layers, rule = capture_layers(config, teacher.num_hidden_layers)
    check_topk_fits(cfg, teacher.vocab_size)
    width = teacher.hidden_size
    float_rows = len(layers) * ("hidden" in cfg.capture) + sum(layer >= 1 for layer in layers) * ("delta" in cfg.capture)
    lengths = [len(e.input_ids) for e in examples]
    groups = plan_groups(lengths, cfg.shard_tokens)
    rows = sum(-(-sum(lengths[i] for i in group) // cfg.chunk_tokens) * cfg.chunk_tokens for group in groups)
    per_token = bytes_per_token(cfg.storage_dtype, cfg.topk_codec, width, float_rows, cfg.top_k)
    row_shape, row_dtype = row_format(cfg.storage_dtype, width)
    head = (teacher.vocab_size + 1) * width * 2
    ratio = stored_ratio(cfg.compressor, cfg.storage_dtype)
    params = parameter_count(teacher, trust_remote_code=config.runtime.trust_remote_code)
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.runtime.dtype, device)
    rate = matmul_rate(device, dtype)
    flops = 2 * params * counts["tokens"] + 3 * 2 * params * sum(len(e.input_ids) for e in attribution)
    return {"examples": counts["examples"], "tokens": counts["tokens"], "groups": len(groups), "layers": list(layers),
            "layers_rule": rule, "float_rows_per_token": float_rows,
            "row_bytes": int(np.prod(row_shape)) * np.dtype(row_dtype).itemsize,
            "bytes_per_token_raw": per_token, "activation_bytes_raw": per_token * rows,
            "activation_bytes_stored": int(per_token * rows / ratio), "stored_ratio_assumed": ratio,
            "teacher_head_bytes": head, "parameters": params, "flops": flops, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "matmul_flops_per_s": rate, "seconds": flops / rate}


def capture_layers(config: PktConfig, teacher_layers: int) -> tuple[tuple[int, ...], dict | None]:
    """The teacher layers to capture, and how `extract.layers: auto` derived them (None for listed layers).

    `auto` reads the student's depth from its config alone (AutoConfig of `student`), never its weights."""
    cfg = config.extract
    if cfg.layers == "auto":
        student = load_model_config(config.student, trust_remote_code=config.runtime.trust_remote_code,
                                    needed_for="extract.layers: auto reads the student's depth")
        layers, rule = auto_layers(config, teacher_layers, student.num_hidden_layers, tuple(cfg.capture))
    else:
        layers, rule = (tuple(sorted(set(cfg.layers))) if cfg.layers else tuple(range(teacher_layers + 1))), None
    if layers and max(layers) > teacher_layers:
        raise ValueError(f"extract.layers must lie in 0..{teacher_layers} for this teacher, got {list(layers)}")
    return layers, rule


def check_topk_fits(cfg: ExtractConfig, vocab_size: int) -> None:
    """Refuse a top-k the teacher's vocabulary cannot fill, or ids the chosen top-k codec cannot store."""
    if cfg.top_k > vocab_size:
        raise ValueError(f"extract.top_k ({cfg.top_k}) exceeds the teacher's vocabulary size ({vocab_size})")
    if cfg.topk_codec == "uint8" and vocab_size > MAX_PACKED_ID:
        raise ValueError(f"extract.topk_codec=uint8 stores token ids in 3 bytes (< {MAX_PACKED_ID}); this teacher's "
                         f"vocabulary has {vocab_size}: use extract.topk_codec=exact")


def reopen_damaged_groups(writer: CacheWriter, echo=print) -> list[int]:
    """Take the groups whose shards fail their checksum out of the ledger, so this run re-extracts them.

    What the manifest (or, before it exists, the ledger) records is checked file by file: the advice
    "rerun `pkt extract`" that a damaged cache gives must repair it, not find "nothing to do".
    Only the token-major group shards can be rewritten in place; other damage is refused.
    """
    problems = damaged_files(writer.files)
    groups, other = set(), []
    for key, problem in problems.items():
        group = _group_of(key)
        if group is None:
            other.append(problem)
        else:
            groups.add(group)
    if other:
        raise CacheError(f"{writer.files.url} is damaged beyond what a rerun can repair in place: "
                         f"{'; '.join(other[:5])}{f' and {len(other) - 5} more' if len(other) > 5 else ''}. "
                         "Re-extract it with `pkt extract --overwrite` and the same settings.")
    if groups:
        echo(f"repairing {writer.files.url}: {len(problems)} damaged file(s) ({'; '.join(list(problems.values())[:5])}"
             f"{' ...' if len(problems) > 5 else ''}); re-extracting group(s) {sorted(groups)}")
        for group in sorted(groups):
            if writer.files.exists(ledger_key(group)):
                writer.files.fs.rm(writer.files.full(ledger_key(group)))
    return sorted(groups)


def _group_of(key: str) -> int | None:
    """The group of a token-major shard file (`hidden/02/c/7/0` -> 7) or ledger entry; None for other files."""
    if key.startswith(f"{LEDGER_DIR}/group-") and key.endswith(".json"):
        return int(key[len(f"{LEDGER_DIR}/group-"):-len(".json")])
    array, _, chunk = key.partition("/c/")
    if array.split("/")[0] in TOKEN_MAJOR and chunk.split("/")[0].isdigit():
        return int(chunk.split("/")[0])
    return None


def resolve_attribution_data(cfg: ExtractConfig, data_path: Path) -> Path:
    if cfg.attribution_data:
        return resolve_data(cfg.attribution_data)
    sibling = data_path.with_name("extract.jsonl")
    return sibling if sibling.is_file() else data_path


def _attribution(config, tokenizer, model, path: Path, rank: int, world: int,
                 progress: bool) -> tuple[dict[str, np.ndarray], int]:
    cfg = config.extract
    examples, _ = load_examples(path, tokenizer, cfg.prompt_format, cfg.max_length, cfg.train_on_inputs,
                                limit=cfg.attribution_examples or None)
    scores, used = accumulate_attribution(model, examples[rank::world], cfg.attribution_aggregation, progress=progress)
    if world > 1:
        totals = torch.tensor(np.concatenate([*(scores[t] for t in TARGETS), [used]]), dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        scores = dict(zip(TARGETS, totals[:-1].numpy().reshape(len(TARGETS), -1)))
        used = int(totals[-1].item())
    return scores, used


def _write_teacher_head(writer: CacheWriter, model, storage_dtype: str, codec) -> None:
    from pkt_pipeline.cache.codecs import dense_dtype
    from pkt_pipeline.cache.layout import encode

    storage_dtype = dense_dtype(storage_dtype)  # the head is never stored lossy: the semantic map is built from it
    norm, head, eps = final_norm_and_head(model)
    encoded_head = encode(head, storage_dtype)
    writer.write_array("teacher/lm_head", encoded_head, chunks=(min(4096, head.shape[0]), head.shape[1]), codec=codec,
                       attributes={"pkt_dtype": storage_dtype, "norm_eps": eps})
    writer.write_array("teacher/final_norm", encode(norm, storage_dtype), chunks=tuple(norm.shape), codec=codec,
                       attributes={"pkt_dtype": storage_dtype})


def _write_tokenizer(writer: CacheWriter, tokenizer) -> None:
    """The teacher's tokenizer files (chat template included) under `tokenizer/`: stage two decodes teacher ids
    and re-renders the teacher's text with them, without the teacher."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pkt-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                writer.files.write_bytes(f"{TOKENIZER_DIR}/{path.name}", path.read_bytes())


def _run_extras(names: list[str], writer: CacheWriter, model, tokenizer, config: PktConfig, data_path: Path, codec,
                progress: bool, timings: dict[str, float] | None = None) -> dict[str, ExtraEntry]:
    """Run each requested teacher extra and store its arrays; returns {name: its record} for the manifest.

    Each extra's run time goes to `timings`, not to its provenance: the manifest must not vary between runs."""
    provenance = {}
    for name in names:
        started = time.perf_counter()
        extra = build_extra(config, name)
        output = extra.compute(model, tokenizer, config, data_path, progress)
        for key, data in output.arrays.items():
            rows = max(1, (16 << 20) // max(1, data[:1].nbytes)) if data.ndim else 1
            chunks = (min(rows, data.shape[0]), *data.shape[1:]) if data.ndim else ()
            writer.write_array(f"extras/{name}/{key}", data, chunks=chunks, codec=codec, attributes={})
        provenance[name] = ExtraEntry({**output.provenance, "inputs": extra.inputs(config)})
        if timings is not None:
            timings[name] = round(time.perf_counter() - started, 1)
    return provenance


def _stale_extras(names: list[str], stored: dict[str, ExtraEntry], config: PktConfig) -> dict[str, list[str]]:
    """{name: the changed input keys} for each requested extra the cache holds for other inputs.

    An extra stored without `inputs` (made before they were recorded) counts as stale: what it was
    made from is unknown."""
    stale = {}
    for name in names:
        if name not in stored:
            continue
        before, now = stored[name].inputs, build_extra(config, name).inputs(config)
        if before is None:
            stale[name] = ["inputs not recorded"]
        elif before != now:
            stale[name] = sorted(key for key in {*before, *now} if before.get(key) != now.get(key))
    return stale


def _run_record(config, model, tokenizer, examples, counts, settings, prompt, data_path, attribution_path, n_groups,
                layers_rule) -> dict:
    cfg = config.extract
    # an exact top-k leaves `topk_codec` absent, so a cache's identity is what it was before the key existed
    capture = Capture(layers=settings.layers, kinds=settings.kinds, final_layer=FINAL_LAYER_RAW, top_k=settings.top_k,
                      storage_dtype=settings.storage_dtype, compressor=cfg.compressor,
                      compression_level=cfg.compression_level, topk_codec=settings.topk_codec,
                      absent=frozenset({"topk_codec"}) if settings.topk_codec == "exact" else frozenset())
    return run_record(
        version=__version__, teacher=teacher_info(model, str(config.teacher)), tokenizer=tokenizer_info(tokenizer),
        capture=capture, prompt=Prompt(**prompt), layout=Layout(cfg.chunk_tokens, cfg.shard_tokens, n_groups),
        dataset=DatasetInfo(path=str(data_path), fingerprint=dataset_fingerprint(examples, prompt)),
        counts=Counts(**counts),
        attribution=AttributionSource(data=str(attribution_path), aggregation=cfg.attribution_aggregation,
                                      limit=cfg.attribution_examples),
        layers_rule=layers_rule)
