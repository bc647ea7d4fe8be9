"""What each cache codec costs and loses, on real teacher activations.

Rows are read (read-only) from existing bf16 caches of the real teacher, re-encoded with each
activation codec (`pkt_pipeline/cache/codecs.py`) and decoded as `pkt align` would read them:

- bytes/token: raw, and after the cache's own compressor (zstd-3 over 512-row chunks, as
  `pkt extract` stores them), per float row and for the whole token at the cache's layers;
- fidelity vs the bf16 rows: relative L2 (||x' - x|| / ||x||, mean over tokens), cosine (mean and
  minimum over tokens), linear CKA per example and layer (tokens x width, mean and minimum), for
  the hidden states and the deltas derived from them (what SemAlign v2 aligns);
- top-k: KL(exact || quantised) per token of the uint8 top-k codec against the stored float32 one,
  over the k entries plus the rest of the mass as one bucket (the `rest` mode of the KD loss).

    python bench/cache_fidelity.py [--cache DIR ...] [--examples 12] [--out bench/results/cache_fidelity.json]

What the codecs do to training (short KD and SemAlign runs from one cache per codec): bench/codec_training.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

from pkt_pipeline.cache import open_cache
from pkt_pipeline.cache.codecs import ACTIVATION_CODECS, decode_rows, decode_topk, encode_rows, encode_topk
from pkt_pipeline.residual import residual_delta

SMOKE = ["/work/main/experiments/transfer/mmlu-smoke/cache", "/work/main/experiments/transfer/gsm-smoke/cache"]
CHUNK = 512


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [T, D] representations of the same tokens (centred over tokens)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    gram_x, gram_y = x @ x.T, y @ y.T  # [T, T]: cheaper than the [D, D] form for T << D
    return float((gram_x * gram_y).sum() / (gram_x.norm() * gram_y.norm()))


def compressed_bytes(rows: np.ndarray) -> int:
    zstd = Zstd(level=3)
    return sum(len(zstd.encode(np.ascontiguousarray(rows[start:start + CHUNK])))
               for start in range(0, len(rows), CHUNK))


def fidelity(reference: list[torch.Tensor], decoded: list[torch.Tensor]) -> dict:
    """Per-token relative L2 and cosine, per-example CKA, of decoded vs reference [T, D] rows."""
    ref, out = torch.cat(reference).float(), torch.cat(decoded).float()
    rel = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    cka = [linear_cka(r.float(), d.float()) for r, d in zip(reference, decoded) if len(r) > 2]
    return {"relative_l2_mean": float(rel.mean()), "relative_l2_max": float(rel.max()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "cka_mean": float(np.mean(cka)), "cka_min": float(np.min(cka))}


def topk_kl(values: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token over the k entries and the rest of the mass, from [T, k] log-probs. A quantised
    top-k may sum past 1: its rest is then 0 (as the KD loss takes it) and the k+1 buckets are renormalised."""
    def buckets(logprobs):
        p = logprobs.double().exp()
        p = torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0)], -1)
        return p / p.sum(-1, keepdim=True)
    p, q = buckets(values), buckets(back)
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(1e-300))).sum(-1)


def measure(path: str, n_examples: int, layers: list[int] | None) -> dict:
    cache = open_cache(path, read_path="zarr")
    ids = cache.index.column("example_id").to_pylist()[:n_examples]
    capture = cache.manifest.capture  # a cache older than `capture.final_layer` refuses its normed last layer
    layers = layers or [l for l in cache.layers if l < cache.manifest.teacher.num_layers or capture.final_layer]
    width, all_layers = cache.manifest.teacher.hidden_size, len(cache.layers)
    hidden = {layer: [cache.hidden(layer, i) for i in ids] for layer in layers}
    deltas = {layer: [residual_delta(h, p).to(torch.bfloat16) for h, p in zip(hidden[layer], hidden[layer - 1])]
              for layer in layers if layer - 1 in hidden}
    tokens = sum(len(x) for x in next(iter(hidden.values())))
    result = {"cache": path, "examples": len(ids), "tokens": tokens, "layers_measured": layers, "width": width,
              "cache_layers": all_layers, "codecs": {}}
    for codec in ACTIVATION_CODECS:
        started = time.perf_counter()
        raw = stored = 0
        decoded_hidden, decoded_delta = {}, {}
        for layer, rows in hidden.items():
            encoded = [encode_rows(x, codec) for x in rows]
            whole = np.concatenate(encoded)
            raw += whole.nbytes
            stored += compressed_bytes(whole)
            decoded_hidden[layer] = [decode_rows(e, codec) for e in encoded]
        for layer, rows in deltas.items():
            decoded_delta[layer] = [residual_delta(h, p).to(torch.bfloat16)
                                    for h, p in zip(decoded_hidden[layer], decoded_hidden[layer - 1])]
        per_row_raw, per_row_stored = raw / (tokens * len(layers)), stored / (tokens * len(layers))
        hidden_fid = fidelity([x for rows in hidden.values() for x in rows],
                              [x for rows in decoded_hidden.values() for x in rows])
        delta_fid = fidelity([x for rows in deltas.values() for x in rows],
                             [x for rows in decoded_delta.values() for x in rows]) if deltas else None
        by_layer = {layer: float(torch.nn.functional.cosine_similarity(
            torch.cat(decoded_hidden[layer]).float(), torch.cat(hidden[layer]).float(), dim=-1).mean())
            for layer in layers}
        worst_layer = min(by_layer, key=by_layer.get)
        result["codecs"][codec] = {
            "row_bytes_raw": per_row_raw, "row_bytes_stored": per_row_stored,
            "stored_ratio_vs_bf16_raw": 2 * width / per_row_stored,
            "hidden": hidden_fid, "delta_derived": delta_fid,
            "worst_layer": {"layer": worst_layer, "cosine_mean": by_layer[worst_layer]},
            "seconds": round(time.perf_counter() - started, 1)}
        print(f"  {codec}: {per_row_stored:.0f} B/row stored, cos {hidden_fid['cosine_mean']:.5f}", flush=True)
    values = torch.cat([cache.topk(i)[0] for i in ids])
    indices = torch.cat([cache.topk(i)[1] for i in ids])
    topk = {}
    for codec in ("exact", "uint8"):
        stored_values, stored_ids = encode_topk(values, indices, codec)
        back_values, back_ids = decode_topk(stored_values, stored_ids, codec)
        kl = topk_kl(values, back_values)
        topk[codec] = {"bytes_raw": (stored_values.nbytes + stored_ids.nbytes) / len(values),
                       "bytes_stored": (compressed_bytes(stored_values) + compressed_bytes(stored_ids)) / len(values),
                       "ids_equal": bool(torch.equal(back_ids, indices)),
                       "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
                       "max_abs_logprob_error": float((back_values - values).abs().max())}
    result["topk"] = topk
    k = values.shape[1]
    result["per_token_at_cache_layers"] = {
        f"{codec}+{tk}": result["codecs"][codec]["row_bytes_stored"] * all_layers + topk[tk]["bytes_stored"]
        for codec in ACTIVATION_CODECS for tk in ("exact", "uint8")}
    result["top_k"] = k
    return result


def table(results: list[dict]) -> str:
    lines = [f"{'cache':10s} {'codec':12s} {'B/row':>7s} {'ratio':>6s} {'relL2':>8s} {'cos':>8s} {'cos min':>8s} "
             f"{'CKA':>7s} {'d relL2':>8s} {'d cos':>7s} {'d CKA':>7s}"]
    for r in results:
        name = Path(r["cache"]).parent.name
        for codec, c in r["codecs"].items():
            h, d = c["hidden"], c["delta_derived"] or {}
            lines.append(f"{name:10s} {codec:12s} {c['row_bytes_stored']:7.0f} {c['stored_ratio_vs_bf16_raw']:6.2f} "
                         f"{h['relative_l2_mean']:8.4f} {h['cosine_mean']:8.5f} {h['cosine_min']:8.4f} {h['cka_mean']:7.4f} "
                         f"{d.get('relative_l2_mean', float('nan')):8.4f} {d.get('cosine_mean', float('nan')):7.4f} "
                         f"{d.get('cka_mean', float('nan')):7.4f}")
        for codec, t in r["topk"].items():
            lines.append(f"{name:10s} topk {codec:7s} {t['bytes_raw']:5.0f} B raw {t['bytes_stored']:5.0f} B stored, "
                         f"KL mean {t['kl_mean']:.2e} p99 {t['kl_p99']:.2e} max {t['kl_max']:.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", nargs="+", default=SMOKE)
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="default: every cached layer")
    parser.add_argument("--out", default="bench/results/cache_fidelity.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for path in args.cache:
        print(f"{path}:", flush=True)
        results.append(measure(path, args.examples, args.layers))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
