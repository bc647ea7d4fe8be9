"""`seeking`: LoRA-SFT started from the teacher's most sensitive weight blocks, as rank-r LoRA.

Seeking Neural Nuggets (Zhong et al., ICLR 2024; METHOD.md section 2), the PostPKT baseline.

Stage one (`pkt extract --with seeking`, `teacher.py`) cached, per student layer and LoRA
target, rank-r factors B0 [out, r], A0 [r, in] of a teacher weight block. Here the student's peft
LoRA starts as B = B0 / scaling, A = A0, so that the adapter's update scaling · B @ A is that block's
rank-r approximation, and each base weight is offset by the same amount, W' = W - scaling · B @ A:
the starting model is the student itself (as in the published code, which merged a negated "delta"
adapter into the base). Training is then exactly lora-sft: cross-entropy on the answers, the shared
trainer, every LoRA parameter. A smaller `align.lora.r` than the cached rank keeps the leading
singular directions.

What gets saved. The trained model is W' + scaling · B @ A. `model/` (merged) holds exactly that. A
rank-r adapter on the *original* student cannot express it (W + s·BA ≠ W - s·B0A0 + s·BA), so
`finalize` rewrites the adapter, as peft does for PiSSA (`path_initial_model_for_weight_conversion`):
the base weights go back to W and the adapter becomes rank 2r, B' = [B, B0], A' = [A; -A0] with
lora_alpha doubled (same scaling), i.e. W + s·(BA - B0A0). `adapter/` therefore loads onto the
original student (`PeftModel.from_pretrained(student, adapter)`), and its `adapter_config.json` says
r = 2·align.lora.r. With a bf16 base the round trip W' + s·B0A0 is exact only up to bf16 rounding, as
any merge into bf16 weights is.

Budget and recipe. Under pkt's default config Seeking trains on the budget every method shares (the
`align` section of configs/default.yaml: its lr, batch, steps and LoRA alpha), which is not how it
was published. The published recipe of both stages — lr, batch (reached by micro-batches), epochs,
warm-up, LoRA r/alpha/dropout, and the sensitivity's seed examples and answer-only loss — is
`--recipe published`, every value with the file of the published code it comes from in
`pkt_pipeline/recipes.py`. It matters more here than for lora-sft: B0 carries the block's singular
values, so a rate tuned for a zero-started LoRA moves this start by far more.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .teacher import EXTRA, factor_key
from ..sft.student import LoraSFT

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def lora_modules(model: nn.Module) -> dict[tuple[int, str], nn.Module]:
    """peft's LoRA layers of a decoder, keyed (0-based layer, module name)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layer = LAYER_INDEX.search(f".{name}.")
            if layer is None:
                raise ValueError(f"LoRA module {name} is outside the decoder layers; Seeking initialises only "
                                 "modules of `model.layers`")
            found[(int(layer.group(1)), name.rsplit(".", 1)[-1])] = module
    return found


class Seeking(LoraSFT):
    def __init__(self, context):
        super().__init__(context)
        self.factors = context.cache.extra(EXTRA)  # a cache without it is refused, naming `pkt extract --with seeking`
        self.provenance = context.cache.manifest.extras[EXTRA].provenance
        self.initial: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        """(A0, B0) as the LoRA started, to undo the base offset in `finalize`."""

    def setup(self, model: nn.Module) -> None:
        layers = lora_modules(model)
        if not layers:
            raise ValueError("seeking starts the student's LoRA from cached factors, but the model has no LoRA layer")
        rank, cached = self.config.lora.r, int(self.provenance["rank"])
        student = self.provenance["student"]
        if rank > cached:
            raise ValueError(f"align.lora.r is {rank} but the cache's seeking factors have rank {cached}; lower "
                             f"align.lora.r or extract them again with `pkt extract --with seeking --set "
                             f"methods.seeking.teacher.rank={rank}` into a fresh cache")
        depth = model.config.num_hidden_layers
        if depth != int(student["layers"]):
            raise ValueError(f"the cache's seeking factors were made for a {student['layers']}-layer student "
                             f"({student['id']}), this student has {depth} layers; extract them for this student "
                             "with `pkt extract --with seeking --set student=STUDENT` into a fresh cache")
        adapter = model.active_adapter
        for (layer, module), lora in sorted(layers.items()):
            key_a, key_b = factor_key(layer, module, "lora_A"), factor_key(layer, module, "lora_B")
            if key_a not in self.factors:
                raise ValueError(f"the cache's seeking factors cover {self.provenance['modules']}, not {module} of "
                                 f"align.lora.target_modules; use the same target modules in stage one and two")
            weight = lora.get_base_layer().weight
            a0 = torch.from_numpy(self.factors[key_a][:rank])
            b0 = torch.from_numpy(self.factors[key_b][:, :rank])
            if (b0.shape[0], a0.shape[1]) != tuple(weight.shape):
                raise ValueError(f"the cache's seeking factors for layer {layer} {module} are "
                                 f"{(b0.shape[0], a0.shape[1])}, the student's weight is {tuple(weight.shape)}; "
                                 "extract them for this student with "
                                 "`pkt extract --with seeking --set student=STUDENT`")
            scaling = lora.scaling[adapter]
            lora_a, lora_b = lora.lora_A[adapter].weight, lora.lora_B[adapter].weight
            with torch.no_grad():
                lora_a.copy_(a0)
                lora_b.copy_(b0 / scaling)
                # The offset is taken from the parameters as stored, so it cancels their update exactly.
                offset = scaling * (lora_b.float() @ lora_a.float())
                weight.copy_((weight.float() - offset.to(weight.device)).to(weight.dtype))
            self.initial[(layer, module)] = (lora_a.detach().clone(), lora_b.detach().clone())

    def finalize(self, model: nn.Module) -> nn.Module:
        """Put the base weights back to the student's and fold the start into a rank-2r adapter (see the
        module docstring), so the saved adapter is right for the original student and the merge unchanged."""
        adapter = model.active_adapter
        config = model.peft_config[adapter]
        for key, lora in lora_modules(model).items():
            a0, b0 = self.initial[key]
            scaling = lora.scaling[adapter]
            weight = lora.get_base_layer().weight
            trained_a, trained_b = lora.lora_A[adapter].weight.detach(), lora.lora_B[adapter].weight.detach()
            with torch.no_grad():
                weight.copy_((weight.float() + scaling * (b0.float() @ a0.float()).to(weight.device)).to(weight.dtype))
            rank = trained_a.shape[0]
            lora.lora_A[adapter] = _linear(torch.cat([trained_a, -a0.to(trained_a)], dim=0))
            lora.lora_B[adapter] = _linear(torch.cat([trained_b, b0.to(trained_b)], dim=1))
            lora.r[adapter] = 2 * rank
            lora.lora_alpha[adapter] = _doubled_alpha(lora.lora_alpha[adapter], lora.use_rslora.get(adapter, False))
        config.r *= 2
        config.lora_alpha = _doubled_alpha(config.lora_alpha, config.use_rslora)
        return model


def _doubled_alpha(alpha: float, rslora: bool) -> float:
    """lora_alpha that keeps alpha / r (alpha / sqrt(r) with rsLoRA) when r doubles."""
    return alpha * math.sqrt(2) if rslora else alpha * 2


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer
