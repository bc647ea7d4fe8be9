"""How well SemAlign's teacher->student map carries the teacher's geometry, on real cached activations.

M = B_S^T B_T (`transpose`, the paper) inherits the LM heads' conditioning; M = pinv(B_S) B_T
(`lstsq`) inverts the student side. The relation loss compares token-token cosine geometry, so what
matters of a map is how much of the teacher's own geometry survives it. Per recompose option and per
paired layer, on the supervised tokens of the first --examples cached examples:

  kept     linear CKA(teacher states, M teacher states): the teacher's geometry the map keeps (1 = all)
  target   linear CKA(student states, M teacher states) before training: how far the target is
  relation the relation loss (losses.relation_loss) between them before training
  self     for a map from the teacher's head to itself: the relation loss of teacher states against
           their own image (0 for a map that keeps geometry; METHOD.md's reviewer objection)

plus the condition number of M. The states are residual contributions (or outputs with --kind hidden)
of the pairing SemAlign would use. Writes JSON and prints a table.

    python bench/map_conditioning.py --cache experiments/transfer/mmlu-smoke/cache \
        --student models/qwen2.5-coder-0.5b-instruct --out docs/results/map_conditioning.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pkt_pipeline.cache import open_cache
from pkt_pipeline.config import load_config
from pkt_pipeline.loader import CacheLoader
from pkt_pipeline.losses import linear_cka, relation_loss
from pkt_pipeline.methods import AlignContext, resolve
from pkt_pipeline.methods.base import forward_student
from pkt_pipeline.models import cpu_facts, load_model, load_tokenizer
from pkt_pipeline.residual import layer_state
from pkt_pipeline.methods.semalign.semantic_map import RECOMPOSE, build_semantic_map


@torch.no_grad()
def measure(cache_path: str, student_path: str, examples: int, kind: str, batch_size: int) -> dict:
    cache = open_cache(cache_path)
    config = load_config(overrides=[f"align.cache={cache_path}", f"student={student_path}", "runtime.dtype=float32",
                                    f"methods.semalign.supervise={kind}"])
    student = load_model(student_path, dtype="float32").eval()
    semalign = resolve(config, "semalign")
    method = semalign.method_class(AlignContext(cache, semalign.align, load_tokenizer(student_path),
                                                settings=semalign.settings))
    method.setup(student)
    pairs = method.pairs
    chosen = cache.index.column("example_id").to_pylist()[:examples]
    loader = CacheLoader(cache, batch_size=batch_size, layers=sorted(set(pairs.values())), kind=kind, topk=False,
                         examples={e: cache.content_hash(e) for e in chosen})
    student_rows: dict[int, list[torch.Tensor]] = {k: [] for k in pairs}
    teacher_rows: dict[int, list[torch.Tensor]] = {p: [] for p in set(pairs.values())}
    batches = []
    for batch in loader:
        states = forward_student(student, batch, hidden_states=True).hidden_states
        mask = batch.supervised & batch.attention_mask.bool()
        for k in pairs:
            student_rows[k].append(layer_state(states, k, kind)[mask].float())
        for p in teacher_rows:
            teacher_rows[p].append(batch.teacher[p][mask].float())
        batches.append((mask, {k: layer_state(states, k, kind).float() for k in pairs},
                        {p: batch.teacher[p].float() for p in teacher_rows}))
    head = cache.teacher_head()
    vocab = cache.manifest.tokenizer.vocab_size
    results = {}
    for recompose in RECOMPOSE:
        started = time.perf_counter()
        semantic = build_semantic_map(head, student.get_output_embeddings().weight, vocab, recompose=recompose)
        self_map = build_semantic_map(head, head["lm_head"].float(), vocab, recompose=recompose)
        singular = torch.linalg.svdvals(semantic.matrix.double())
        layers = {}
        for k, p in pairs.items():
            teacher = torch.cat(teacher_rows[p])
            mapped = semantic.apply(teacher)
            relation = [relation_loss(s[k], semantic.apply(t[p]), m) for m, s, t in batches]
            self_relation = [relation_loss(self_map.apply(t[p]), t[p], m) for m, _, t in batches]
            layers[str(k)] = {"teacher_layer": p, "kept": float(linear_cka(teacher, mapped)),
                              "target": float(linear_cka(torch.cat(student_rows[k]), mapped)),
                              "relation": float(torch.stack(relation).mean()),
                              "self": float(torch.stack(self_relation).mean())}
        results[recompose] = {"condition_number": float(singular[0] / singular[-1]), "layers": layers,
                              "seconds": round(time.perf_counter() - started, 1)}
    return {"pairs": {str(k): p for k, p in pairs.items()}, "tokens": int(sum(len(t) for t in next(iter(teacher_rows.values())))),
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--kind", choices=("delta", "hidden"), default="delta")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="bench/results/map_conditioning.json")
    args = parser.parse_args()
    started = time.perf_counter()
    measured = measure(args.cache, args.student, args.examples, args.kind, args.batch_size)
    record = {"bench": "map_conditioning", "cache": args.cache, "student": args.student, "examples": args.examples,
              "kind": args.kind, "cpu": cpu_facts(), **measured, "seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"pairs {measured['pairs']}; {measured['tokens']} tokens")
    print(f"{'map':10s} {'cond(M)':>10s} {'layer':>6s} {'kept':>7s} {'target':>7s} {'relation':>9s} {'self':>7s}")
    for recompose, result in measured["results"].items():
        for k, layer in result["layers"].items():
            print(f"{recompose:10s} {result['condition_number']:10.1f} {k:>6s} {layer['kept']:7.3f} "
                  f"{layer['target']:7.3f} {layer['relation']:9.4f} {layer['self']:7.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
