"""Left-padded batches for scoring forwards (MMLU letters, reference NLL).

Left padding puts every row's last real token in the final column, so `logits_to_keep` can keep
just the columns being scored; position ids come from the attention mask, so a padded row sees
the positions of an unbatched forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, else the eos id (padding is masked, so any id serves); an error when it has neither."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad batches with")
    return pad_id


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each [rows, longest], the sequences right-aligned."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence):] = 1
    return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)
