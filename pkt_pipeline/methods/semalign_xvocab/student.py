"""`semalign-xvocab`: SemAlign for a student with another tokenizer than the cache's teacher. pkt's own extension
of SemAlign, not a published method.

SemAlign needs one vocabulary on both sides twice: its semantic bases are rows of the two LM heads for the same
tokens, and its output term is a KL over one next-token distribution. Here
- the map M is built (`semalign.semantic_map.build_semantic_map`) from the teacher's and the student's LM-head
  rows of the *shared-string vocabulary* alone (`vocabulary.shared_vocabulary`: tokens whose decoded strings are
  identical; their count and share of each vocabulary go to `metrics.json` and the `--report-map` report);
- the layer term (SemAlign's relation or Fisher loss, the v2 frontier schedule) compares the student's state at
  token s with the mapped teacher state at token t for every aligned pair (t, s) (`Batch.student.pairs`: both end
  at the same content character), both of the `layer_tokens`;
- the output term is `alm`'s chunk likelihood term (`alm.student.chunk_likelihoods_from`: aligned chunks'
  likelihoods, the teacher's from the cached `target_logprob`, compared by a binarised divergence) in place of the
  top-k KL, weighted by `lambda_out`.

It reads from the cache: the paired teacher layers (hidden or delta), the teacher's LM head and final norm, the
teacher's tokenizer (`tokenizer/`), the examples' sources and token spans, and `target_logprob`; never the top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from ...losses import binarised_likelihood_divergence, relation_loss
from ...residual import decoder_of, forward_with_residual_stream, layer_state, unwrapped
from ..alm.student import chunk_likelihoods_from, scored_chunks
from ..semalign.semantic_map import SemanticMap, build_semantic_map
from ..semalign.student import SemAlign
from .vocabulary import SharedVocabulary, shared_vocabulary


class SemAlignXVocab(SemAlign):
    cross_tokenizer = True
    needs_topk = False
    needs_target_logprob = True
    report_file = "vocabulary_report.json"

    def __init__(self, context):
        super().__init__(context)
        settings, section = self.settings, f"methods.{self.name}"
        if settings.objective != "v2":
            raise ValueError(f"{section}.objective={settings.objective}: only the v2 objective (layer term + output "
                             "term, frontier schedule) aligns across tokenizers")
        if (settings.kl_mode, settings.kl_temperature) != ("rest", 1.0):
            raise ValueError(f"{section}.kl_mode and kl_temperature have no effect: the output term here is the chunk "
                             f"likelihood term (set {section}.chunk_temperature and divergence)")
        self.vocabulary: SharedVocabulary | None = None

    def build_map(self, model: nn.Module) -> SemanticMap:
        """The map from the LM-head rows of the shared-string vocabulary alone."""
        cache, settings = self.context.cache, self.settings
        self.vocabulary = shared_vocabulary(cache.teacher_tokenizer(), self.context.tokenizer)
        weight = model.get_output_embeddings().weight.detach()
        head = cache.teacher_head()
        inside = (self.vocabulary.teacher_ids < len(head["lm_head"])) & (self.vocabulary.student_ids < len(weight))
        if not inside.all() or not len(self.vocabulary):
            raise ValueError(f"{self.name}: {len(self.vocabulary)} shared-string tokens, {int((~inside).sum())} of them "
                             f"outside an LM head (teacher {tuple(head['lm_head'].shape)}, student {tuple(weight.shape)})"
                             ": the map needs shared tokens with rows in both heads")
        teacher_rows = torch.from_numpy(self.vocabulary.teacher_ids)
        student_rows = torch.from_numpy(self.vocabulary.student_ids).to(weight.device)
        return build_semantic_map({**head, "lm_head": head["lm_head"][teacher_rows]}, weight[student_rows],
                                  len(self.vocabulary), recompose=settings.recompose, map_space=settings.map_space)

    def run_metrics(self) -> dict:
        return {"shared_vocabulary": self.vocabulary.summary()} if self.vocabulary is not None else {}

    def report(self, model, make_loader, when, so_far):
        """The shared-string vocabulary and the layer pairing (SemAlign's map report reads the teacher's tokens)."""
        return so_far or {**self.run_metrics(), "pairs": {str(k): p for k, p in self.pairs.items()}}

    @classmethod
    def format_report(cls, report):
        vocabulary = report["shared_vocabulary"]
        return [f"shared-string vocabulary: {vocabulary['shared_tokens']} tokens, "
                f"{vocabulary['teacher_share']:.1%} of the teacher's {vocabulary['teacher_vocab']}, "
                f"{vocabulary['student_share']:.1%} of the student's {vocabulary['student_vocab']}"]

    def aligned_layer_pairs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, teacher positions, student positions), [P] each, grouped by row: the aligned pairs whose tokens are
        `layer_tokens` on both sides."""
        student = batch.student
        teacher_mask = batch.tokens_mask(self.settings.layer_tokens).bool() & batch.attention_mask.bool()
        student_mask = student.tokens_mask(self.settings.layer_tokens).bool() & student.attention_mask.bool()
        return student.pairs_where(teacher_mask, student_mask)

    def loss_units(self, batch, phase):
        """The layer term's mean runs over sequences with 2+ aligned pairs (relation) or over the pairs (fisher),
        the chunk term's over the scored chunks."""
        if batch.student is None:  # a rank's empty slice of a short batch
            return {"layer": 0, "chunks": 0}
        rows = self.aligned_layer_pairs(batch)[0]
        counts = torch.bincount(rows, minlength=len(batch.student.pairs))
        layer = int((counts >= 2).sum()) if self.settings.layer_loss == "relation" else len(rows)
        return {"layer": layer, "chunks": len(scored_chunks(batch, self.config.output_tokens)[0])}

    def loss(self, model, batch, phase):
        return self.weighted_loss(model, batch, phase, {"layer": 1.0, "chunks": 1.0})

    def paired_states(self, states: tuple[torch.Tensor, ...], batch,
                      phase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student [B, P, D_S], mapped teacher [B, P, D_S], mask [B, P]): the phase's student layer at s and its
        teacher partner at t for each aligned pair, left-packed per row in text order."""
        k = phase.student_layer
        rows, teacher, own = self.aligned_layer_pairs(batch)
        width = len(batch.student.pairs)
        counts = torch.bincount(rows, minlength=width)
        slot = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
        size = (width, int(counts.max()) if len(rows) else 0)
        student = layer_state(states, k, self.teacher_kind)[rows, own]  # [N, D_S]
        target = self.semantic_map.apply(batch.teacher[self.pairs[k]][rows, teacher])  # [N, D_S]
        mask = torch.zeros(size, dtype=torch.bool, device=rows.device).index_put(
            (rows, slot), torch.ones(len(rows), dtype=torch.bool, device=rows.device))
        packed = [torch.zeros(*size, x.shape[-1], dtype=x.dtype, device=x.device).index_put((rows, slot), x)
                  for x in (student, target)]
        return packed[0], packed[1], mask

    def weighted_loss(self, model, batch, phase, shares):
        own = batch.student
        body, head = decoder_of(model), unwrapped(model).get_output_embeddings()
        out, states = forward_with_residual_stream(body, input_ids=own.input_ids, attention_mask=own.attention_mask,
                                                   use_cache=False)
        student, target, mask = self.paired_states(states, batch, phase)
        if self.settings.layer_loss == "relation":
            layer = relation_loss(student, target, mask, normalise_student=self.settings.normalise_student)
        else:
            layer = self._fisher(model, student, target, mask)
        student_logp, teacher_logp, _ = chunk_likelihoods_from(out.last_hidden_state, head, batch,
                                                               self.config.output_tokens)
        chunks = binarised_likelihood_divergence(student_logp, teacher_logp, self.settings.chunk_temperature,
                                                 self.settings.divergence)
        settings = self.settings
        total = settings.lambda_layer * shares["layer"] * layer + settings.lambda_out * shares["chunks"] * chunks
        return total, {"layer": layer.item() * shares["layer"], "chunks": chunks.item() * shares["chunks"]}
