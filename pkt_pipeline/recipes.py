"""The baselines' published recipes: the one place their published settings are written down.

pkt's own defaults (configs/default.yaml) give every method the same small budget, so the whole
`dvc repro` fits 30 minutes on a 2-core CPU. That is far from how Seeking and LaTen were published,
so each one's published recipe is kept here, as overrides of the config, and is one switch away:

    pkt extract --recipe published ...      # stage one: the extras' published settings
    pkt align --method seeking --recipe published ...
    pkt config --recipe published           # print what it resolves to

A recipe is layered over the config file and under `--set` overrides. It writes only `methods.<name>`
sections: the method's settings, its overrides of `align` (`align:`) and its teacher extra's settings
(`teacher:`), as a config file's do, so applying it never changes another method's run. Each value below names the file
of the published code it comes from; every setting those files fix that pkt exposes is written
out, including those equal to pkt's defaults, so this file alone says what "published" means.

What a recipe does not carry, because the methods share it (METHOD.md section 3: every method on the
same data): the transfer data and its size (`extract.data`, `extract.limit`; the papers used the
1000-row train split: `extract.limit: 0`), the supervision mask (`extract.train_on_inputs`) and the
LoRA target modules (`align.lora.target_modules`).
"""

from __future__ import annotations

import copy
from typing import Any

SEEKING_REPOSITORY = "github.com/maszhongming/ParaKnowTransfer@1a104a2"
LATEN_REPOSITORY = "github.com/Trae1ounG/Neural_Incompatibility@bba32ea"

SEEKING_PUBLISHED: dict[str, Any] = {"methods": {"seeking": {
    "teacher": {
        # data/*/sample_*.jsonl hold 32 rows each (utils/get_sample_data.py: n_sample = 32), the seed
        # data extract_lora_with_sensitivity.py sums the sensitivity over.
        "seed_examples": 32,
        # extract_lora_with_sensitivity.py: calculate_sensitivity(..., loss_on_output=True) sets the labels
        # of everything up to "<|assistant|>\n" to -100.
        "sensitivity_tokens": "answer",
        # extract_lora_with_sensitivity.py: --r, default 16.
        "rank": 16,
    },
    "align": {
        "lr": 3.0e-4,            # train.sh: --learning_rate 3e-4
        "batch_size": 64,        # train.sh: --batch_size 64 (finetune.py accumulates gradients up to it)
        "micro_batch_size": 8,   # train.sh: --micro_batch_size 8 per forward
        "epochs": 3.0,           # train.sh: --num_epochs 3
        "steps": 0,              # the epochs decide the steps
        "warmup_ratio": 0.03,    # finetune.py: TrainingArguments(warmup_ratio=0.03), then linear decay to 0
        "warmup_steps": 0,       # so that the ratio applies
        "weight_decay": 0.0,     # finetune.py keeps TrainingArguments' default (optim adamw_torch)
        "max_grad_norm": 1.0,    # finetune.py keeps TrainingArguments' default
        "lora": {
            "r": 16,             # train.sh: --lora_r 16 (configs/Llama-2/adapter_7b.json: r 16)
            "alpha": 16,         # finetune.py: lora_alpha=16 (adapter_7b.json too): a LoRA scaling of 1
            "dropout": 0.05,     # finetune.py: lora_dropout=0.05
        },
    },
}}}
"""Seeking Neural Nuggets (Zhong et al., ICLR 2024), from SEEKING_REPOSITORY. Left as pkt has them:
the published run also put LoRA on q/k/gate, the embedding and the LM head (pkt trains up/down/v/o
for every method), trained in fp16 with cutoff 2048 and seed 1."""

LATEN_PUBLISHED: dict[str, Any] = {"methods": {"laten": {
    "teacher": {
        # train_LaTen.py saves the translator after every step (checkpoint_{idx}); the Qwen script of the
        # published code, rebuttal/LaTen_qwen/inference_LaTen_qwen.sh, evaluates steps "[7]": 8 steps, one
        # per located example. (The Llama script inference_LaTen.sh evaluates "[0]", after 1 step;
        # inference_LaTen.py's default sweeps checkpoints 4-8.) Only the examples trained on need locating.
        "locate_examples": 8,
        # knowledge_neurons/knowledge_neurons.py: get_prob(get_bsvalues_llama(...)) softmaxes the whole vocabulary.
        "readout_vocab": 0,
        # knowledge_neurons.py: final_var, the std of the final layer's output, normalises every patched state.
        "readout_norm": "final",
        "transfer_rate": 0.1,    # train_LaTen.sh: transfer_rate=0.1
        # train_LaTen.py: EXTRACT_FFN_MODULE = [down_proj, up_proj], EXTRACT_ATTN_MODULE = [o_proj, v_proj].
        "modules": ["up_proj", "down_proj", "v_proj", "o_proj"],
        "seed": 42,              # train_LaTen.sh: --seed 42
    },
    "align": {
        # train_LaTen.sh (and the Qwen train_LaTen_qwen.sh): lr=3e-4, the peak of the one-cycle schedule.
        # (README.md's example and train_LaTen.py's default say 3e-5.)
        "lr": 3.0e-4,
        "steps": 0,              # train_LaTen.py: one optimizer step per located example ...
        "epochs": 1.0,           # ... once through them
        "micro_batch_size": 1,   # train_LaTen.py: micro_batch_size=1, gradients summed over the step
        # train_LaTen.py has no gradient clipping.
        "max_grad_norm": float("inf"),
    },
    "align_examples": 15,      # train_LaTen.py: random.sample(range(len(align_data)), 15) + the located one
    "mse_weight": 1000.0,      # train_LaTen.py: total_loss = lm_loss + current_mse_loss * 1000
    "hidden_size": 0,          # knowledge_translator.py: Linear(input_dim, input_dim), D_T wide
    "init_std": 1.0e-5,        # knowledge_translator.py: nn.init.normal_(weight, mean=0, std=1e-5)
    # train_LaTen.py: AdamW(lr=learning_rate, weight_decay=0.05, betas=(0.9, 0.95)).
    "weight_decay": 0.05,
    "betas": [0.9, 0.95],
    # train_LaTen.py: OneCycleLR(max_lr=learning_rate, total_steps=len(extract_data), pct_start=0.1,
    # final_div_factor=1, anneal_strategy='cos'); div_factor and cycle_momentum are torch's defaults.
    "schedule_steps": 0,
    "pct_start": 0.1,
    "div_factor": 25.0,
    "final_div_factor": 1.0,
    "anneal_strategy": "cos",
    "cycle_momentum": True,
}}}
"""Locate-then-Align (Tan et al., ACL 2025), from LATEN_REPOSITORY. Left as pkt has them: the
published student and translated deltas were fp16 (pkt keeps the deltas in float32, where the
published cast rounds a freshly initialised translator's output, ~1e-8, to 0) and examples were cut
at 768 tokens; the README sets train_on_inputs for MMLU, which pkt's MMLU configs already do."""


def _merged(*trees: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for tree in trees:
        for section, content in tree.items():
            merged.setdefault(section, {}).update(copy.deepcopy(content))
    return merged


RECIPES: dict[str, dict[str, Any]] = {"published": _merged(SEEKING_PUBLISHED, LATEN_PUBLISHED)}
"""Name -> overrides of the config (the shape of a config file), for `--recipe NAME`."""


def recipe(name: str) -> dict[str, Any]:
    """A copy of the recipe `name`'s overrides; KeyError naming the known recipes when there is none."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return copy.deepcopy(RECIPES[name])
