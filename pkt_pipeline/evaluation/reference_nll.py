"""Teacher-forced negative log-likelihood of a reference answer: the continuous metric of the
generative tasks (GSM8K, HumanEval, MBPP).

Pass@1 and exact match move only when a whole greedy answer flips from wrong to right, so at the
few hundred items a CPU can generate they cannot see a change of a few points. The mean NLL per
token of the reference solution, given the prompt the model is evaluated with, moves with every
change of the model's belief about that solution, costs one forward pass per item (no
generation), and is paired item by item like accuracy.

Each item gives a `context` (the rendered prompt, plus any start of the reply that is not scored)
and a `target` (the reference reply, scored). They are tokenized separately and concatenated, so
the scored tokens are exactly `tokenizer.encode(target)`; a chat-rendered context ends at the
assistant header, a clean token boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..models import input_device
from .batching import left_padded, pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def reference_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, contexts: list[str], targets: list[str],
                  batch_size: int = 8, progress: bool = True, desc: str = "nll",
                  add_special_tokens: bool = False) -> list[dict]:
    """Per item, in input order: {"nll": mean NLL per target token (nats), "tokens": target length}.

    Items are batched shortest-first and left-padded, so every row's target occupies the last
    columns; position ids come from the attention mask (padded rows see the positions of an
    unbatched forward) and the LM head runs only over the target columns.
    `add_special_tokens` applies to the context (True for raw prompts that need the tokenizer's
    BOS; a chat template writes its own).
    """
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    pad_id = pad_token_id(tokenizer)
    context_ids = [tokenizer.encode(c, add_special_tokens=add_special_tokens) for c in contexts]
    target_ids = [tokenizer.encode(t, add_special_tokens=False) for t in targets]
    for i, (context, target) in enumerate(zip(context_ids, target_ids)):
        if not context or not target:
            raise ValueError(f"item {i}: empty {'context' if not context else 'target'} after tokenization")
    device = input_device(model)
    model.eval()
    order = sorted(range(len(contexts)), key=lambda i: len(context_ids[i]) + len(target_ids[i]))
    results: list[dict | None] = [None] * len(contexts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start:start + batch_size]
        input_ids, attention_mask, position_ids = left_padded([context_ids[i] + target_ids[i] for i in rows], pad_id)
        # The logit at column c predicts token c + 1: the longest target needs its own length + 1 columns.
        keep = max(len(target_ids[i]) for i in rows) + 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids.to(device), logits_to_keep=keep).logits  # [B, keep, V]
        for r, i in enumerate(rows):
            length = len(target_ids[i])
            predicting = logits[r, keep - 1 - length:keep - 1].float()  # [length, V]
            labels = torch.tensor(target_ids[i], device=predicting.device)
            token_nll = torch.nn.functional.cross_entropy(predicting, labels, reduction="none")
            results[i] = {"nll": float(token_nll.mean()), "tokens": length}
    return results
