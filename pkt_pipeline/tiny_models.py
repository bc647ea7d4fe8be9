"""Tiny random Qwen2 models that share one small tokenizer, built offline in seconds.

They stand in for a real teacher/student pair wherever a real model would be too slow: the
test suite and the tiny pipeline config. Teacher and student differ in depth and width, as a
real cross-scale pair does, and share a byte-level BPE tokenizer with a ChatML chat template,
so every code path (chat formatting, answer masks, vocab checks) runs as on real models.
Everything is seeded: two builds give identical weights and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The tiny cross-tokenizer student's own template and special tokens: another chat format than the
# teacher's ChatML, so that only the messages' contents are shared between the two renders.
OTHER_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
OTHER_SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A little English, arithmetic and Python so the BPE learns merges for the kinds of text
# pkt's transfer data holds; the byte alphabet covers everything else.
_CORPUS = """\
Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? Answer: 48 + 24 = 72. #### 72
The following are multiple choice questions (with answers) about abstract algebra. Answer: B
def add(a, b):
    return a + b
def is_even(n: int) -> bool:
    \"\"\"Return True if n is even.\"\"\"
    return n % 2 == 0
for i in range(10):
    print(i * i)
Write a function to find the maximum of three numbers. The answer is (C) because the teacher knows.
"""


@dataclass(frozen=True)
class TinyShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int


TEACHER_SHAPE = TinyShape(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128)
STUDENT_SHAPE = TinyShape(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)


def build_tokenizer(vocab_size: int = 384, special_tokens: list[str] = SPECIAL_TOKENS,
                    chat_template: str = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained on a fixed corpus, wrapped for transformers.

    `special_tokens` are (pad, the template's markers..., eos): the first pads, the last ends a turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=special_tokens[-1],
        pad_token=special_tokens[0],
        additional_special_tokens=special_tokens[1:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(shape: TinyShape, vocab_size: int, seed: int, eos_token_id: int, pad_token_id: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()


def save_tiny_pair(out_dir: str | Path) -> dict[str, Path]:
    """Write `teacher/` and `student/` HF directories (float32) under `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    paths = {}
    for role, shape, seed in (("teacher", TEACHER_SHAPE, 1), ("student", STUDENT_SHAPE, 2)):
        model = build_model(shape, len(tokenizer), seed, tokenizer.eos_token_id, tokenizer.pad_token_id)
        paths[role] = out_dir / role
        model.save_pretrained(paths[role], safe_serialization=True)
        tokenizer.save_pretrained(paths[role])
    return paths


def save_tiny_cross_student(out_dir: str | Path) -> Path:
    """A tiny student (the student's shape) with a tokenizer of its own: another vocabulary (320 tokens, other
    merges and special tokens) and another chat template than the tiny teacher's, for cross-tokenizer methods."""
    tokenizer = build_tokenizer(320, OTHER_SPECIAL_TOKENS, OTHER_TEMPLATE)
    tokenizer.unk_token = OTHER_SPECIAL_TOKENS[0]  # else a Qwen2 model's tokenizer class adds its own `<|endoftext|>`
    model = build_model(STUDENT_SHAPE, len(tokenizer), 5, tokenizer.eos_token_id, tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
