"""`laten`: Locate-then-Align (Tan et al., ACL 2025; METHOD.md section 2), the PrePKT baseline.

Stage one (`pkt extract --with laten`, `teacher.py`) cached, per located example, the
teacher's top layers and neurons and their weight rows/columns. Here:

1. setup: the student's own neurons, scored the same way on the same examples (all L_S of its
   layers are "the top L_S"), and the translator: one MLP per module type, D_T -> H -> D_S with
   ReLU, no bias, N(0, init_std) init (H = D_T as published);
2. each step takes one located example: the translator maps its teacher vectors to student width,
   and forward hooks on the student's own up/down/v/o modules add them at the student's top
   neurons (rank r of the teacher to rank r of the student) — exactly W' = W + delta, without
   materialising W'. Each of the step's examples (the located one and `align_examples` seeded
   alignment examples) contributes its mean token LM loss plus `mse_weight` x the mean square of the
   translated vectors (per module kind, summed), and the step's loss is their *sum*, as published
   (each example backpropagates its own loss; the gradients add up). Only the translator trains;
   the student stays frozen. The optimizer is AdamW and the schedule torch's one-cycle, as published,
   with every value from `methods.laten` (`LatenConfig`); the schedule spans one step per example of the
   extract split, and training stops after the located ones: the published checkpoint part-way along it;
3. finalize: the injection example's translated vectors are written into the student's weights,
   which are what `model/` holds. (The published training script keeps only the translator; its
   inference script does this injection, with one train-split example's neurons.)

The published recipe, each value with its source, is `pkt_pipeline/recipes.py` (`--recipe published`).

How large the edit gets is the method's, not a defect. The translator starts at N(0, init_std) in both
layers, so its output starts near init_std^2 x |v| x width (~1e-10 on the tiny pair: 1e-9 of the edited
weights' norm). Adam then moves every translator weight by about the rate per step, and the output,
two sums over the width, grows faster than the width: with the published recipe (8 steps of 16
examples on the 20-step schedule) on random pairs of student width 32 / 128 / 512 (teacher twice as
wide) the edited weights moved by 8e-6–6e-5 / 1e-4–5e-4 / 1e-3–3e-3 of their norm. The tiny pair (32)
is at the bottom of that range; pkt's old 3-step budget there gave 5e-7–4e-6 (issue 13 saw ~1e-7).
What was checked and found right: the gradient reaches every translator weight, through the hooks only;
the hooks equal editing the weights; the saved float32 weights carry the translated deltas at exactly
the located neurons (tests/test_laten.py). One pkt departure did shrink the edit: the step's per-example
losses were averaged, not summed as published, so every gradient was 16x smaller, and in the first
steps (~1e-8 per weight) Adam's eps of 1e-8 then damps the update (up to 2x less edit on the tiny pair);
the loss is now the published sum. An edit this small only survives evaluation in float32: loaded in
bf16 (what `runtime.dtype: auto` picks on a GPU or a bf16 CPU), W + delta rounds back to W wherever
delta is under ~0.2-0.4% of W.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...cache import CacheError
from ...loader import Batch, ExampleMeta
from ..base import Method, Phase, forward_student
from .teacher import MODULE_KIND, ROW_MODULES, ModelShape, Readout, locate, module_of

SUBMODULE = "laten"
log = logging.getLogger(__name__)


class Translator(nn.Module):
    """One MLP per module type mapping teacher vectors (D_T) to student vectors (D_S)."""

    def __init__(self, modules: list[str], teacher_width: int, student_width: int, hidden: int = 0,
                 init_std: float = 1e-5):
        super().__init__()
        hidden = hidden or teacher_width
        self.nets = nn.ModuleDict({module: nn.Sequential(nn.Linear(teacher_width, hidden, bias=False), nn.ReLU(),
                                                         nn.Linear(hidden, student_width, bias=False))
                                   for module in modules})
        for parameter in self.parameters():
            nn.init.normal_(parameter, mean=0.0, std=init_std)

    def forward(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {module: self.nets[module](value) for module, value in vectors.items()}


class NeuronInjection(nn.Module):
    """Holds the translator and adds translated vectors at chosen neurons through forward hooks.

    For a row module (up, v) the edit is W[idx, :] += delta, so the output gains x @ delta^T at
    `idx`; for a column module (down, o) it is W[:, idx] += delta^T, so the output gains
    x[..., idx] @ delta. `bake` writes the same edit into the weights.
    """

    def __init__(self, translator: Translator):
        super().__init__()
        self.translator = translator
        self._handles: list = []
        self._active: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def attach(self, model: nn.Module, modules: list[str], layers: int) -> None:
        for layer in range(layers):
            for module in modules:
                target = module_of(model, layer, module)
                self._handles.append(target.register_forward_hook(self._hook(layer, module)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._active = [], None

    def activate(self, deltas: dict[str, torch.Tensor], neurons: dict[str, torch.Tensor]) -> None:
        """deltas: module -> [L_S, k, D_S]; neurons: module -> [L_S, k] student neuron ids."""
        self._active = (deltas, neurons)

    def deactivate(self) -> None:
        self._active = None

    def _hook(self, layer: int, module: str):
        def hook(_, inputs, output):
            if self._active is None:
                return None
            delta, index = self._active[0][module][layer], self._active[1][module][layer]
            x = inputs[0]
            delta = delta.to(x.dtype)
            if module in ROW_MODULES:
                return output.index_add(-1, index, (x @ delta.T).to(output.dtype))
            return output + (x.index_select(-1, index) @ delta).to(output.dtype)
        return hook

    @staticmethod
    @torch.no_grad()
    def bake(model: nn.Module, deltas: dict[str, torch.Tensor], neurons: dict[str, torch.Tensor]) -> None:
        for module, delta in deltas.items():
            for layer in range(delta.shape[0]):
                weight = module_of(model, layer, module).weight
                value, index = delta[layer].to(weight.dtype), neurons[module][layer].to(weight.device)
                if module in ROW_MODULES:
                    weight.index_add_(0, index, value)
                else:
                    weight.index_add_(1, index, value.T)


class LatenExamples:
    """The examples stage one cached for LaTen: located (one per step), injection, alignment."""

    def __init__(self, arrays: dict[str, np.ndarray], provenance: dict):
        offsets = arrays["examples/offsets"]
        tokens, supervised = arrays["examples/tokens"], arrays["examples/supervised"].astype(bool)
        self.ids = [*provenance["locate"], provenance["inject"], *provenance["align"]]
        if len(self.ids) != len(offsets) - 1:
            raise CacheError(f"the laten extra is inconsistent: {len(self.ids)} example ids, {len(offsets) - 1} "
                             "token spans; re-extract it")
        self.tokens = [tokens[a:b].astype(np.int64) for a, b in zip(offsets[:-1], offsets[1:])]
        self.supervised = [supervised[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        self.targets = arrays["examples/targets"].astype(np.int64)
        self.steps = len(provenance["locate"])
        self.inject = self.steps
        self.align = list(range(self.steps + 1, len(self.ids)))

    def meta(self, position: int, located: int) -> ExampleMeta:
        """Every member names its step's located example, so any micro-batch of the step knows whose deltas
        to inject (positions, since ids may repeat across splits)."""
        return ExampleMeta(position, "align" if position > self.steps else "locate", located)

    def located(self, batch: Batch) -> int:
        if not batch.meta:
            raise ValueError(f"a LaTen batch names its located example in `meta`; this one has none "
                             f"(examples {batch.example_ids[:4]})")
        located = batch.meta[0].anchor
        if located is None or not 0 <= located < self.steps:
            raise ValueError(f"not a LaTen batch member: {batch.meta[0]} (examples {batch.example_ids[:4]})")
        return located


class LatenBatches:
    """One batch per located example: it first, then `align` seeded alignment examples; resumable.

    A `BatchSource`, like the cache loader.
    """

    def __init__(self, examples: LatenExamples, align: int, seed: int):
        self.examples, self.align, self.seed = examples, min(align, len(examples.align)), seed
        self._epoch, self._done = 0, 0
        digest = hashlib.sha256(json.dumps([examples.ids, self.align, seed]).encode())
        self._fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return self.examples.steps

    def batches(self, steps: int) -> Iterator[Batch]:
        for _ in range(steps):
            batch = self._batch(self._epoch, self._done)
            self._done += 1
            if self._done == len(self):
                self._epoch, self._done = self._epoch + 1, 0
            yield batch

    def _batch(self, epoch: int, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, epoch, step])
        drawn = rng.choice(self.examples.align, self.align, replace=False).tolist() if self.align else []
        members = [step, *drawn]
        lengths = torch.tensor([len(self.examples.tokens[i]) for i in members])
        mask = torch.arange(int(lengths.max())) < lengths[:, None]
        input_ids = torch.zeros(mask.shape, dtype=torch.long)
        supervised = torch.zeros(mask.shape, dtype=torch.bool)
        input_ids[mask] = torch.from_numpy(np.concatenate([self.examples.tokens[i] for i in members]))
        supervised[mask] = torch.from_numpy(np.concatenate([self.examples.supervised[i] for i in members]))
        return Batch([self.examples.ids[i] for i in members], input_ids, mask.long(), supervised, {}, None, None,
                     meta=tuple(self.examples.meta(i, step) for i in members))

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._done, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError("the saved loader position belongs to other LaTen examples, align count or seed; "
                             "start afresh with --overwrite")
        self._epoch, self._done = int(state["epoch"]), int(state["batches_done"])

    def close(self) -> None:
        pass

    def __enter__(self) -> LatenBatches:
        return self

    def __exit__(self, *exc) -> None:
        pass


class LaTen(Method):
    uses_lora = False
    frozen_student = True  # only the translator trains (float32); `finalize` bakes its deltas in float32
    micro_batch_size = 1  # the published loop: one example per forward, gradients summed over the step

    def __init__(self, context):
        super().__init__(context)
        self.arrays = context.cache.extra("laten")
        self.provenance = context.cache.manifest.extras["laten"].provenance
        self.modules: list[str] = list(self.provenance["modules"])
        self.examples = LatenExamples(self.arrays, self.provenance)
        if self.examples.steps == 0:
            raise CacheError("the cache's laten extra located no example to train on; re-extract it")
        self.step_examples = 1 + min(self.settings.align_examples, len(self.examples.align))
        """Examples in every step: the located one and the alignment examples drawn with it."""

    def setup(self, model: nn.Module) -> None:
        shape = ModelShape.of(model.config)
        recorded = self.provenance["student"]
        if ModelShape(**recorded["shape"]) != shape:
            raise ValueError(f"the cache's laten extra was located for a student shaped {recorded['shape']} "
                             f"({recorded['id']}); this student is shaped {shape.__dict__}. Extract it again for "
                             "this student: `pkt extract --with laten --set student=STUDENT --overwrite`")
        device = next(model.parameters()).device
        counts = self.provenance["counts"]
        readout = Readout(model, vocab=int(self.provenance["settings"].get("readout_vocab", 0)))
        # The student's neurons of every located example, on the unedited student (as published).
        found = [locate(model, self.examples.tokens[i], int(self.examples.targets[i]), shape.layers, counts, readout,
                        self.provenance["readout_norm"]) for i in range(self.examples.steps + 1)]
        self.student_neurons = [{module: torch.as_tensor(location.neurons[MODULE_KIND[module]], device=device)
                                 for module in self.modules} for location in found]
        self.teacher_vectors = {module: torch.from_numpy(self.arrays[f"vectors/{module}"]).to(device, torch.float32)
                                for module in self.modules}
        teacher_width = int(self.provenance["teacher_shape"]["hidden"])
        translator = Translator(self.modules, teacher_width, shape.hidden, self.settings.hidden_size,
                                self.settings.init_std).to(device)
        self.injection = NeuronInjection(translator)
        self.injection.attach(model, self.modules, shape.layers)
        model.add_module(SUBMODULE, self.injection)

    def loader(self, phase: Phase, seed: int) -> LatenBatches:
        return LatenBatches(self.examples, self.settings.align_examples, seed)

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW at `align.lr` with LaTen's own weight decay and betas (`methods.laten`)."""
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.settings.weight_decay,
                                 betas=tuple(self.settings.betas))

    def scheduler(self, optimizer: torch.optim.Optimizer, phase: Phase) -> torch.optim.lr_scheduler.LRScheduler:
        """torch's one-cycle schedule peaking at `align.lr`, over `schedule_length` steps."""
        total = self.schedule_length()
        if phase.steps > total:
            raise ValueError(f"LaTen's one-cycle schedule spans {total} steps but this run takes {phase.steps}; "
                             "lower align.steps/align.epochs or lengthen methods.laten.schedule_steps")
        settings = self.settings
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.config.lr, total_steps=total, pct_start=settings.pct_start,
            anneal_strategy=settings.anneal_strategy, div_factor=settings.div_factor,
            final_div_factor=settings.final_div_factor, cycle_momentum=settings.cycle_momentum)

    def schedule_length(self) -> int:
        """`methods.laten.schedule_steps`, else one step per example of the extract split (as published)."""
        if self.settings.schedule_steps:
            return self.settings.schedule_steps
        recorded = self.provenance.get("extract_examples")
        if recorded is None:
            log.warning("this cache's laten extra predates the record of the extract split's size; the one-cycle "
                        "schedule spans the %d located examples instead (re-extract it for the published length)",
                        self.examples.steps)
            return self.examples.steps
        return int(recorded)

    def trainable(self, model: nn.Module, phase: Phase) -> list[str]:
        return [name for name, _ in model.named_parameters() if name.startswith(f"{SUBMODULE}.translator.")]

    def translate(self, located: int) -> dict[str, torch.Tensor]:
        """module -> [L_S, k, D_S]: the translated teacher vectors of one located example."""
        return self.injection.translator({module: vectors[located] for module, vectors in self.teacher_vectors.items()})

    def loss(self, model, batch, phase):
        located = self.examples.located(batch)
        deltas = self.translate(located)
        self.injection.activate(deltas, self.student_neurons[located])
        try:
            out = forward_student(model, batch)
        finally:
            self.injection.deactivate()
        lm = per_example_cross_entropy(out.logits, out.targets, out.positions)
        mse = sum(delta.pow(2).mean() for delta in deltas.values())
        # The trainer weights a micro-batch by its share of the step's examples (`loss_units`); the published
        # objective sums the examples' losses, so the mean is scaled back up to that sum.
        per_example = lm + self.settings.mse_weight * mse
        return self.step_examples * per_example, {"lm": lm.item(), "mse": mse.item()}

    def loss_units(self, batch: Batch, phase: Phase) -> dict[str, int]:
        """A mean over examples, each its own mean over tokens (the published micro-batches of one)."""
        return {"examples": len(batch.example_ids)}

    def injected_deltas(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The final edit: the injection example's translated vectors and the student neurons they go to."""
        with torch.no_grad():
            return self.translate(self.examples.inject), self.student_neurons[self.examples.inject]

    def finalize(self, model: nn.Module) -> nn.Module:
        deltas, neurons = self.injected_deltas()
        self.injection.detach()
        delattr(model, SUBMODULE)
        # The deltas are ~1e-5 (the square penalty keeps them small): bf16 weights would round them away.
        model = model.float()
        NeuronInjection.bake(model, deltas, neurons)
        return model


def per_example_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean token cross-entropy (the published micro-batches of one)."""
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    rows = positions.nonzero()[:, 0]
    count = torch.bincount(rows, minlength=positions.shape[0])
    total = token_loss.new_zeros(positions.shape[0]).index_add(0, rows, token_loss)
    keep = count > 0
    return (total[keep] / count[keep]).mean()


__all__ = ["LaTen", "LatenBatches", "NeuronInjection", "Translator", "per_example_cross_entropy"]
