"""`alm`: Approximate Likelihood Matching (Minixhofer et al. 2025, "Universal Cross-Tokenizer Distillation via
Approximate Likelihood Matching"), from the cache.

Two tokenizations of one text have no common next-token distribution, but they do agree on the probability of a
stretch of text: an aligned *chunk* (`pkt_pipeline.xtok`: the teacher's tokens [t0, t1) and the student's tokens
[s0, s1) that cover exactly the same content characters) has likelihood p_T = prod p_T(token | prefix) under the
teacher and p_S likewise under the student, and matching p_S to p_T is matching the two models on that text.
Each is read as a Bernoulli {p, 1 - p} (p^(1/temperature)) and compared by a binary divergence
(`losses.binarised_likelihood_divergence`), mean over chunks.

The teacher side is the cache's `target_logprob`: the teacher's log-prob of each token actually in the text,
stored by stage one because the top-k misses the token wherever the teacher did not rank it high. A chunk counts
when every token in it is scored (`align.output_tokens`) on both sides and has a predicting position (t0, s0 >= 1).
pkt's chunks are tokenkit's `unconstrained` kind, cut at every shared boundary inside message contents; the
paper's debiasing of chunk ends (its `unbiased`/`space` kinds, which need the teacher's full distribution at
each chunk end) is not cached and not done.
"""

from __future__ import annotations

import torch

from ...losses import binarised_likelihood_divergence
from ...residual import decoder_of, unwrapped
from ..base import Method


def chunk_sums(token_logprobs: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
               stops: torch.Tensor) -> torch.Tensor:
    """[C] log-likelihood of each chunk: the sum of `token_logprobs` [B, T] (at t: log p(token t+1 | <= t)) over
    the positions predicting tokens [start, stop) of row `rows`, i.e. positions start-1 .. stop-2."""
    totals = torch.nn.functional.pad(token_logprobs.double().cumsum(1), (1, 0))  # [B, T+1]: sum of positions < i
    return (totals[rows, stops - 1] - totals[rows, starts - 1]).to(token_logprobs.dtype)


def scored_chunks(batch, tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [C], chunks [C, 4] (t0, t1, s0, s1)): the aligned chunks whose every token is one of `tokens` on both
    sides and predicted from a position in the sequence."""
    student = batch.student
    teacher_scored = batch.tokens_mask(tokens).bool() & batch.attention_mask.bool()
    student_scored = student.tokens_mask(tokens).bool() & student.attention_mask.bool()
    teacher_count = torch.nn.functional.pad(teacher_scored.long().cumsum(1), (1, 0))  # [B, T+1]
    student_count = torch.nn.functional.pad(student_scored.long().cumsum(1), (1, 0))  # [B, S+1]
    rows, kept = [], []
    for row, chunks in enumerate(student.chunks):
        chunks = chunks.to(teacher_count.device)
        t0, t1, s0, s1 = chunks.unbind(1)
        keep = (t0 >= 1) & (s0 >= 1) & (t1 <= teacher_scored.shape[1]) & (s1 <= student_scored.shape[1])
        chunks, (t0, t1, s0, s1) = chunks[keep], (x[keep] for x in (t0, t1, s0, s1))
        whole = ((teacher_count[row, t1] - teacher_count[row, t0] == t1 - t0)
                 & (student_count[row, s1] - student_count[row, s0] == s1 - s0))
        rows.append(torch.full((int(whole.sum()),), row, dtype=torch.long, device=chunks.device))
        kept.append(chunks[whole])
    if not rows:
        return (torch.zeros(0, dtype=torch.long, device=teacher_count.device),
                torch.zeros(0, 4, dtype=torch.long, device=teacher_count.device))
    return torch.cat(rows), torch.cat(kept)


def chunk_likelihoods_from(states: torch.Tensor, head: torch.nn.Module, batch,
                           tokens: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student [C], teacher [C]: the log-likelihood of each `scored_chunks` chunk under each model, in its order;
    the student's cross-entropy over its scored next tokens), from the student's final states [B, S, D_S] over its
    own tokens: a method that runs the student forward for other terms too reuses that forward."""
    student = batch.student
    scored = batch.student.scored_next(tokens)  # [B, S]: positions whose next token is scored
    logits = head(states[scored]).float()  # [N, V_S]
    picked = logits.gather(1, student.input_ids[:, 1:][scored[:, :-1]][:, None])[:, 0]
    token_logp = torch.zeros(scored.shape, dtype=logits.dtype, device=logits.device)  # [B, S]
    token_logp[scored] = picked - torch.logsumexp(logits, -1)
    ce = -token_logp[scored].sum() / max(int(scored.sum()), 1)
    rows, chunks = scored_chunks(batch, tokens)
    teacher_logp = chunk_sums(batch.target_logprob.float(), rows, chunks[:, 0], chunks[:, 1])
    return chunk_sums(token_logp, rows, chunks[:, 2], chunks[:, 3]), teacher_logp, ce


class ApproximateLikelihoodMatching(Method):
    cross_tokenizer = True
    needs_target_logprob = True

    def scored_chunks(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`scored_chunks` under `align.output_tokens`."""
        return scored_chunks(batch, self.config.output_tokens)

    def loss_units(self, batch, phase):
        """The chunk term averages over the scored chunks, the cross-entropy over the student's scored next tokens."""
        if batch.student is None:  # a rank's empty slice of a short batch
            return {"chunks": 0, "student_tokens": 0}
        return {"chunks": int(len(self.scored_chunks(batch)[0])),
                "student_tokens": int(batch.student.scored_next(self.config.output_tokens).sum())}

    def loss(self, model, batch, phase):
        return self.weighted_loss(model, batch, phase, {"chunks": 1.0, "student_tokens": 1.0})

    def chunk_likelihoods(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`chunk_likelihoods_from` one student forward over its own tokens."""
        student = batch.student
        body, head = decoder_of(model), unwrapped(model).get_output_embeddings()
        states = body(input_ids=student.input_ids, attention_mask=student.attention_mask,
                      use_cache=False).last_hidden_state  # [B, S, D_S]
        return chunk_likelihoods_from(states, head, batch, self.config.output_tokens)

    def weighted_loss(self, model, batch, phase, shares):
        student_logp, teacher_logp, ce = self.chunk_likelihoods(model, batch)
        settings = self.settings
        alm = binarised_likelihood_divergence(student_logp, teacher_logp, settings.temperature, settings.divergence)
        total = (settings.ce_weight * shares["student_tokens"] * ce
                 + settings.distill_weight * shares["chunks"] * alm)
        return total, {"ce": ce.item() * shares["student_tokens"], "alm": alm.item() * shares["chunks"]}
