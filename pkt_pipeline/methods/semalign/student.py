"""`semalign`: latent semantic alignment (METHOD.md section 1), from the cache alone.

Setup builds the fixed pieces once: the teacher->student map M from the two LM heads (the teacher's
comes from the cache) and the layer pairing p(k) from the cached attribution. Then:

- v2 (default), the frontier schedule: one phase per aligned student layer k, shallow to deep; only
  layer k trains (earlier layers keep what they learned) on
  lambda_layer * L_layer(student delta_k, M teacher delta_p(k)) + lambda_out * KL(teacher top-k || student);
- v1: one phase over every aligned layer with 1 - cos(h_k, M h_p(k)) + 1 - cos(logits, one-hot).
"""

from __future__ import annotations

import torch
from torch import nn

from ...losses import cosine_loss, fisher_surrogate, label_cosine_loss, relation_loss
from ...residual import decoder_of, layer_state, unwrapped
from .semantic_map import SemanticMap, attributed_pairing, build_semantic_map, proportional_pairing
from ..base import (LayerNeed, Method, Phase, cached_topk_kl, forward_student, next_token_positions,
                    require_answer_mask)
from .config import SemAlignConfig
from .diagnostics import map_report, report_lines



class SemAlign(Method):
    needs_topk = True
    report_file = "map_report.json"

    def __init__(self, context):
        super().__init__(context)
        settings: SemAlignConfig = self.settings
        if settings.layer_tokens == "answer":
            require_answer_mask(context.cache, "methods.semalign.layer_tokens")
        self.semantic_map: SemanticMap | None = None
        self.pairs: dict[int, int] = {}

    @property
    def uses_lora(self) -> bool:
        return self.settings.trainable == "lora"

    @property
    def teacher_kind(self) -> str:
        return "hidden" if self.settings.objective == "v1" else self.settings.supervise

    @classmethod
    def layer_need(cls, settings: SemAlignConfig, teacher_layers: int, student_layers: int) -> LayerNeed:
        """The teacher layers `setup` can pair with the chosen student layers. Proportional pairing is known
        exactly; attributed pairing picks within +-`pairing_window` of the proportional layer by scores the
        cache computes itself, so the whole window is kept; `critical_layers` may pick any layer, so all."""
        chosen = sorted(set(settings.layers or range(1, student_layers + 1)))
        bad = [k for k in chosen if not 1 <= k <= student_layers]
        if bad:
            raise ValueError(f"methods.semalign.layers {bad} are outside this student's layers 1..{student_layers}")
        base = proportional_pairing(teacher_layers, student_layers)
        kind = "hidden" if settings.objective == "v1" else settings.supervise
        if settings.pairing == "proportional":
            return LayerNeed(frozenset(base[k - 1] for k in chosen), kind,
                             "proportional pairing p(k) = max(1, floor(L_T k / L_S))")
        if settings.critical_layers:
            return LayerNeed(frozenset(range(1, teacher_layers + 1)), kind,
                             "attributed pairing with critical_layers: any teacher layer")
        window = settings.pairing_window
        layers = {p for k in chosen for p in range(max(1, base[k - 1] - window),
                                                    min(teacher_layers, base[k - 1] + window) + 1)}
        return LayerNeed(frozenset(layers), kind, f"attributed pairing: p(k) +- {window} (the window it picks in)")

    def setup(self, model: nn.Module) -> None:
        cache, settings = self.context.cache, self.settings
        student_layers = decoder_of(model).config.num_hidden_layers
        teacher_layers = cache.manifest.teacher.num_layers
        if settings.pairing == "attributed":
            pairing = attributed_pairing(cache.attribution(settings.pairing_score), student_layers,
                                         settings.pairing_window, settings.critical_layers,
                                         distinct=settings.pairing_distinct and teacher_layers >= student_layers)
        else:
            pairing = proportional_pairing(teacher_layers, student_layers)
        chosen = settings.layers or list(range(1, student_layers + 1))
        bad = [k for k in chosen if not 1 <= k <= student_layers]
        if bad:
            raise ValueError(f"methods.semalign.layers {bad} are outside this student's layers 1..{student_layers}")
        self.pairs = {k: pairing[k - 1] for k in sorted(set(chosen))}
        needed = {p for p in self.pairs.values()}
        if self.teacher_kind == "delta" and "delta" not in cache.manifest.capture.kinds:
            needed |= {p - 1 for p in needed}
        missing = sorted(needed - set(cache.layers))
        if missing:
            raise ValueError(f"SemAlign pairs student layers with teacher layers {sorted(set(self.pairs.values()))}, "
                             f"but the cache lacks layers {missing} (cached: {cache.layers}); extract them, or "
                             "choose methods.semalign.layers")
        self.semantic_map = self.build_map(model)

    def build_map(self, model: nn.Module) -> SemanticMap:
        """The teacher->student map from the cached teacher head and the student's, over the shared vocabulary."""
        cache, settings = self.context.cache, self.settings
        return build_semantic_map(
            cache.teacher_head(), model.get_output_embeddings().weight.detach(), cache.manifest.tokenizer.vocab_size,
            recompose=settings.recompose, map_space=settings.map_space)

    def report(self, model, make_loader, when, so_far):
        """The map report: pairing, recomposition fidelity and CKA of the paired layers, before and after."""
        return map_report(self, model, when, so_far)

    @classmethod
    def format_report(cls, report):
        return report_lines(report)

    def phases(self, total_steps: int, student_layers: int) -> list[Phase]:
        if self.settings.objective == "v1":
            return [Phase("v1", total_steps, tuple(sorted(set(self.pairs.values()))))]
        layers = list(self.pairs)
        if self.settings.steps_per_layer:
            steps = [self.settings.steps_per_layer] * len(layers)
        else:
            if total_steps < len(layers):
                raise ValueError(f"{total_steps} steps cannot cover {len(layers)} frontier stages; raise align.steps "
                                 "or align.epochs, or set methods.semalign.steps_per_layer")
            share, extra = divmod(total_steps, len(layers))
            steps = [share + (i < extra) for i in range(len(layers))]
        return [Phase(f"layer {k}", n, (self.pairs[k],), student_layer=k, lr_schedule=self.settings.phase_schedule)
                for k, n in zip(layers, steps)]

    def trainable(self, model: nn.Module, phase: Phase) -> list[str]:
        layers = [phase.student_layer] if phase.student_layer is not None else list(self.pairs)
        owned = {id(p) for k in layers for p in decoder_of(model).layers[k - 1].parameters()}
        return [name for name, p in model.named_parameters()
                if id(p) in owned and (not self.uses_lora or "lora_" in name)]

    def loss(self, model, batch, phase):
        return self.weighted_loss(model, batch, phase, {"layer": 1.0, "output_tokens": 1.0})

    def loss_units(self, batch, phase):
        """The layer term's mean runs over sequences (relation: those with 2+ tokens to compare) or over the
        layer tokens (fisher, v1); the output term's over the scored next tokens."""
        mask = self._layer_mask(batch)
        per_sequence = self.settings.objective == "v2" and self.settings.layer_loss == "relation"
        layer = int((mask.sum(1) >= 2).sum()) if per_sequence else int(mask.sum())
        return {"layer": layer, "output_tokens": int(next_token_positions(batch, self.config.output_tokens)[0].sum())}

    def weighted_loss(self, model, batch, phase, shares):
        out = forward_student(model, batch, hidden_states=True, tokens=self.config.output_tokens)
        mask = self._layer_mask(batch)
        layer_share, output_share = shares["layer"], shares["output_tokens"]
        if self.settings.objective == "v1":
            return self._v1_loss(out, batch, mask, layer_share, output_share)
        k, p = phase.student_layer, self.pairs[phase.student_layer]
        student = layer_state(out.hidden_states, k, self.teacher_kind)
        target = self.semantic_map.apply(batch.teacher[p])
        if self.settings.layer_loss == "relation":
            layer = relation_loss(student, target, mask, normalise_student=self.settings.normalise_student)
        else:
            layer = self._fisher(model, student, target, mask)
        kl = cached_topk_kl(out, batch, self.settings.kl_mode, self.settings.kl_temperature)
        total = self.settings.lambda_layer * layer_share * layer + self.settings.lambda_out * output_share * kl
        return total, {"layer": layer.item() * layer_share, "kl": kl.item() * output_share}

    def _layer_mask(self, batch):
        return batch.tokens_mask(self.settings.layer_tokens) & batch.attention_mask.bool()

    def _fisher(self, model, student, target, mask):
        """The Fisher-weighted surrogate on the student's LM-head logits of its own state and of the
        aligned target; the final RMSNorm makes the target's arbitrary scale irrelevant."""
        norm, head = decoder_of(model).norm, unwrapped(model).get_output_embeddings()
        z = head(norm(student[mask]))
        z_target = head(norm(target[mask].to(student.dtype)))
        return fisher_surrogate(z[None], z_target[None], mask.new_ones(1, int(mask.sum())))

    def _v1_loss(self, out, batch, mask, layer_share, output_share):
        layer = torch.stack([
            cosine_loss(out.hidden_states[k], self.semantic_map.apply(batch.teacher[p]), mask)
            for k, p in self.pairs.items()]).mean()
        output = label_cosine_loss(out.logits, out.targets)
        return (layer_share * layer + output_share * output,
                {"layer": layer.item() * layer_share, "label_cos": output.item() * output_share})

