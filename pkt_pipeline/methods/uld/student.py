"""`uld`: Universal Logit Distillation (Boizard et al. 2024), the cheap cross-tokenizer baseline, from the cache.

The student reads its own tokenization of each cached conversation (`Batch.student`, rendered with its own chat
template). At every aligned pair (teacher token t, student token s: both end at the same content character,
`pkt_pipeline.xtok`) whose next tokens are scored on both sides, the teacher's cached top-k probabilities at t
and the student's probabilities at s are compared as sorted vectors (Wasserstein-1,
`losses.sorted_probability_distance`), which needs no shared vocabulary. Plus cross-entropy on the student's
own next tokens. The published method aligns the two sequences by position after truncating both to the
shorter; pkt aligns them at shared character boundaries, so both models have read the same text there.
"""

from __future__ import annotations

import torch

from ...losses import cross_entropy, next_token_mask, sorted_probability_distance
from ...residual import decoder_of, unwrapped
from ..base import Method


class UniversalLogitDistillation(Method):
    needs_topk = True
    cross_tokenizer = True

    def aligned_positions(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, teacher positions, student positions), [P] each: the aligned pairs whose next token is real and
        scored (`align.output_tokens`) in both tokenizations."""
        teacher_next = next_token_mask(batch.tokens_mask(self.config.output_tokens), batch.attention_mask)
        return batch.student.pairs_where(teacher_next, batch.student.scored_next(self.config.output_tokens))

    def loss_units(self, batch, phase):
        """ULD averages over the aligned pairs, the cross-entropy over the student's scored next tokens."""
        if batch.student is None:  # a rank's empty slice of a short batch
            return {"pairs": 0, "student_tokens": 0}
        return {"pairs": int(len(self.aligned_positions(batch)[0])),
                "student_tokens": int(batch.student.scored_next(self.config.output_tokens).sum())}

    def loss(self, model, batch, phase):
        return self.weighted_loss(model, batch, phase, {"pairs": 1.0, "student_tokens": 1.0})

    def weighted_loss(self, model, batch, phase, shares):
        student = batch.student
        body, head = decoder_of(model), unwrapped(model).get_output_embeddings()
        states = body(input_ids=student.input_ids, attention_mask=student.attention_mask,
                      use_cache=False).last_hidden_state  # [B, S, D_S]
        scored = batch.student.scored_next(self.config.output_tokens)
        ce = cross_entropy(head(states[scored]), student.input_ids[:, 1:][scored[:, :-1]])
        rows, teacher, own = self.aligned_positions(batch)
        uld = sorted_probability_distance(head(states[rows, own]), batch.topk_logprobs[rows, teacher])
        settings = self.settings
        total = (settings.ce_weight * shares["student_tokens"] * ce
                 + settings.distill_weight * shares["pairs"] * uld)
        return total, {"ce": ce.item() * shares["student_tokens"], "uld": uld.item() * shares["pairs"]}
