"""Batched greedy generation for the generative tasks (GSM8K, HumanEval, MBPP).

Prompts are sorted by length so a batch pads little, left-padded so every row's generation starts
at the same column, and rendered through the chat template when the tokenizer has one (instruct
models are evaluated as they are used).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

CODE_INSTRUCTION = "Complete the following Python code. Answer with the code in one ```python block."


def render_user_turn(tokenizer, text: str, chat: bool = True) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def code_user_turn(prompt_text: str) -> str:
    """HumanEval/MBPP as an instruction: the model sees the code to complete in a fenced block."""
    return f"{CODE_INSTRUCTION}\n\n```python\n{prompt_text.rstrip()}\n```"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
             progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of already-rendered prompts, in input order, special tokens removed."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(device)
                generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
                new_tokens = generated[:, encoded["input_ids"].shape[1]:]
                for row, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[row] = text
                bar.update(len(rows))
    finally:
        tokenizer.padding_side = previous_side
    return outputs
