"""Load each converted real model with plain transformers and greedily complete a coding prompt.

Writes bench/results/real_model_smoke.json and prints a short table: load time, tokens/s of
greedy generation and the completion itself, so a person can judge it is sensible.

    python bench/real_model_smoke.py [--models-dir models] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pkt_pipeline.models import cpu_facts

PROMPT = "Write a Python function is_prime(n) that returns True when n is a prime number."
MODELS = ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", default="bench/results/real_model_smoke.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in MODELS:
        path = Path(args.models_dir) / name
        if not (path / "config.json").is_file():
            print(f"skip {name}: {path} absent (run `pkt assets fetch`)")
            continue
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        load_s = time.perf_counter() - started
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        gen_s = time.perf_counter() - started
        new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
        completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append({"model": name, "load_s": round(load_s, 2), "new_tokens": int(new_tokens),
                     "gen_tok_per_s": round(new_tokens / gen_s, 1), "prompt": PROMPT, "completion": completion})
        del model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "cpu": cpu_facts(), "results": rows}, indent=2) + "\n")
    print(f"{'model':32s} {'load s':>7s} {'tok/s':>7s}")
    for row in rows:
        print(f"{row['model']:32s} {row['load_s']:7.2f} {row['gen_tok_per_s']:7.1f}")
    for row in rows:
        print(f"\n--- {row['model']} ---\n{row['completion']}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
