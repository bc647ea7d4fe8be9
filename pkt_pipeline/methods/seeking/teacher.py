"""Seeking's teacher side ("Seeking Neural Nuggets", Zhong et al., ICLR 2024; METHOD.md section 2),
and the stage-one extra `pkt extract --with seeking` that caches it.

**Sensitivity.** For a weight θ and seed examples x, S = Σ_x |θ ⊙ ∇_θ L(x)|, with L(x) the teacher's
mean cross-entropy over the supervised next tokens of x (the HF label convention, as in
`attribution.py`: logits at t-1 predict the supervised token at t). Which tokens are supervised is
`methods.seeking.teacher.sensitivity_tokens`: the answer's only by default, as published
(`loss_on_output=True`), even when the cache supervises every token (`extract.train_on_inputs`).
Each example has its own backward pass, since the absolute value is taken per example. Only the 2-D
weights of the LoRA targets (`align.lora.target_modules`, up/down/v/o by default) of each decoder
layer are scored.

**Selection.** A teacher layer's score is the sum of S over those weights; the top L_S layers
(L_S = the student's depth) are kept in depth order, and the i-th kept teacher layer feeds student
layer i (0-based decoder indices, `model.layers[i]`, throughout). In each kept weight the contiguous
block of the student weight's shape with the largest total S is found with a summed-area table.

**Factors.** The block is factored by SVD into B = U_r Σ_r [out, r] and A = V_r^T [r, in], so that
B @ A is its best rank-r approximation. They are cached unscaled; stage two divides B by peft's
LoRA scaling (alpha / r) so that scaling · B @ A is that approximation again.

Where this departs from the published code (github.com/maszhongming/ParaKnowTransfer), and why:
that code scored and transferred every weight of a layer (q/k/v/o/gate/up/down, plus embedding and
LM head) and summed all of a layer's parameters for the layer score; pkt scores the LoRA targets
every method trains, so Seeking is compared on the same adapters as the other methods. It kept S for
all parameters of the teacher in memory at once; here only the targets' S is kept (see `sensitivity`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...attribution import SupervisedExamples
from ...config import PktConfig
from ...examples import load_examples
from ...residual import decoder_of
from ..teacher import ExtraOutput, TeacherExtra
from .config import SeekingConfig

log = logging.getLogger(__name__)

EXTRA = "seeking"
"""`methods.seeking.teacher.sensitivity_tokens`: the replies only (published), or the cache's supervision mask."""
WeightKey = tuple[int, str]
"""(0-based decoder layer, module name), e.g. (3, "up_proj")."""


def factor_key(student_layer: int, module: str, factor: str) -> str:
    """Cache key of one LoRA factor (`lora_A` or `lora_B`) of a student layer's module."""
    return f"layers.{student_layer}.{module}.{factor}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer stack (Llama/Qwen/Mistral-style `model.layers`)."""
    layers = getattr(decoder_of(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder `layers` list; Seeking needs a decoder-only LM")
    return layers


def target_weights(model: nn.Module, modules: Sequence[str]) -> dict[WeightKey, nn.Parameter]:
    """The 2-D weight of each module named in `modules` in every decoder layer, keyed (layer, module).

    A module matches by the last part of its name, as peft's `target_modules` does."""
    weights: dict[WeightKey, nn.Parameter] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            short = name.rsplit(".", 1)[-1]
            if short in modules and isinstance(getattr(module, "weight", None), torch.Tensor):
                if module.weight.dim() != 2:
                    raise ValueError(f"layer {index} {name}: Seeking needs a 2-D weight, "
                                     f"got {tuple(module.weight.shape)}")
                if (index, short) in weights:
                    raise ValueError(f"layer {index} has two modules named {short!r}; "
                                     "name them apart in target_modules")
                weights[(index, short)] = module.weight
        missing = sorted(set(modules) - {m for i, m in weights if i == index})
        if missing:
            raise ValueError(f"decoder layer {index} of {type(model).__name__} has no module {missing[0]!r} "
                             f"(from align.lora.target_modules {list(modules)})")
    return weights


def supervised_lm_loss(model: nn.Module, input_ids: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one example's supervised next tokens.

    The LM head runs only at the positions that predict a supervised token: at a 150k vocabulary the
    full [T, V] logits and their gradient would cost more memory than a layer's activations."""
    ids = input_ids.unsqueeze(0)
    predict = supervised[1:]
    hidden = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    logits = model.get_output_embeddings()(hidden[predict]).float()
    return F.cross_entropy(logits, ids[0, 1:][predict])


@dataclass
class Sensitivity:
    """S per scored weight (float32, on the model's device) and how many examples it sums."""

    scores: dict[WeightKey, torch.Tensor]
    examples: int
    skipped: int = 0

    def layer_totals(self, n_layers: int) -> np.ndarray:
        """Σ S over the scored weights of each decoder layer, float64 [n_layers]."""
        totals = np.zeros(n_layers, dtype=np.float64)
        for (layer, _), scores in self.scores.items():
            totals[layer] += scores.sum(dtype=torch.float64).item()
        return totals


def sensitivity(model: nn.Module, examples: Iterable,
                modules: Sequence[str] = ("up_proj", "down_proj", "v_proj", "o_proj"),
                progress: bool = False) -> Sensitivity:
    """S = Σ_x |θ ⊙ ∇_θ L(x)| for the 2-D weights of `modules` in every decoder layer.

    `examples` yields objects with `.input_ids` and `.supervised` (numpy, as `examples.Example`);
    those with no supervised token at position ≥ 1 are skipped and counted.

    Memory is bounded by three things. (1) Only the scored weights require grad (every other
    parameter is switched off for the call, then restored), so no other gradient is ever made.
    (2) Each scored weight has a post-accumulate-grad hook that adds |θ · grad| into that weight's
    float32 buffer and frees the grad at once, so at most one weight's gradient (and one float32
    product of its size) is alive at any moment instead of all of them. (3) The LM head runs only
    at the supervised positions (`supervised_lm_loss`). Peak = the teacher's weights + the float32
    buffers + one example's activations and logits. For Qwen2.5-1.5B (28 layers × 1536, intermediate
    8960, v 256 rows) on up/down/v/o: weights 2.9 GiB in bf16 (5.8 GiB fp32), buffers 28 × 30.3M × 4 B
    = 3.2 GiB, one gradient ≤ 55 MB. Measured on CPU (peak RSS, random models of the 1.5B's width
    with 2 and 4 layers, one 1024-token example with every token supervised, extrapolated to 28
    layers): each layer adds 0.32 GiB in bf16 (0.49 GiB fp32) of weights, buffer and activations, and
    the whole peak is about 11.5 GiB in bf16 and 17 GiB in fp32, within a 24 GB machine; shorter
    examples need less (activations and logits scale with the tokens). The model is in eval mode for
    the call (no dropout); its `requires_grad` flags and any `.grad` it held are restored afterwards.
    """
    targets = target_weights(model, modules)
    buffers = {key: torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
               for key, weight in targets.items()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = next(iter(targets.values())).device
    # A gradient already on a scored weight would be accumulated into, and counted as, the first example's.
    held = {key: weight.grad for key, weight in targets.items()}
    handles = []
    supervised_examples = SupervisedExamples(examples, "seeking sensitivity", progress)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        for key, weight in targets.items():
            weight.grad = None
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(_accumulate_into(buffers[key])))
        for input_ids, supervised in supervised_examples:
            with torch.enable_grad():
                supervised_lm_loss(model, input_ids.to(device), supervised.to(device)).backward()
    finally:
        for handle in handles:
            handle.remove()
        for key, weight in targets.items():
            weight.grad = held[key]
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    used, skipped = supervised_examples.used, supervised_examples.skipped
    if skipped:
        log.warning("seeking sensitivity skipped %d example(s) with no supervised token", skipped)
    if not used:
        raise ValueError(f"no seed example has a supervised token to score the teacher with ({skipped} skipped)")
    return Sensitivity(buffers, used, skipped)


def _accumulate_into(buffer: torch.Tensor):
    def hook(weight: torch.Tensor) -> None:
        # `.to` copies only when the grad is not float32 already; either way the grad is dropped next.
        product = weight.grad.to(torch.float32)
        buffer.add_(product.mul_(weight.detach()).abs_())
        weight.grad = None

    return hook


def select_layers(layer_scores: Sequence[float] | np.ndarray, count: int) -> list[int]:
    """The `count` layers of highest score, in depth order (ties go to the shallower layer)."""
    scores = np.asarray(layer_scores, dtype=np.float64)
    if not 1 <= count <= len(scores):
        raise ValueError(f"Seeking keeps {count} teacher layers (the student's depth), but the teacher has "
                         f"{len(scores)}; the student must not be deeper than the teacher")
    return sorted(int(i) for i in np.argsort(-scores, kind="stable")[:count])


@dataclass(frozen=True)
class Block:
    """A contiguous sub-block `[row:row+rows, col:col+cols]` and its total score."""

    row: int
    col: int
    rows: int
    cols: int
    total: float

    def of(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix[self.row:self.row + self.rows, self.col:self.col + self.cols]


def best_subblock(scores: torch.Tensor, rows: int, cols: int) -> Block:
    """The contiguous rows × cols block of `scores` with the largest sum (first in row-major order on ties).

    A summed-area table P (float64, zero-padded) gives every block's sum as four lookups,
    P[r+rows, c+cols] - P[r, c+cols] - P[r+rows, c] + P[r, c], evaluated for all (r, c) at once as
    shifted slices: O(R·C) work and memory for an R × C matrix, no Python loop."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be a matrix, got shape {tuple(scores.shape)}")
    height, width = scores.shape
    if not (1 <= rows <= height and 1 <= cols <= width):
        raise ValueError(f"cannot take a {rows} x {cols} block from a {height} x {width} matrix: Seeking only "
                         "shrinks weights, so the student's must not be larger than the teacher's")
    table = torch.zeros(height + 1, width + 1, dtype=torch.float64, device=scores.device)
    table[1:, 1:] = scores.to(torch.float64).cumsum(0).cumsum(1)
    down, right = height + 1 - rows, width + 1 - cols
    sums = table[rows:, cols:] - table[:down, cols:] - table[rows:, :right] + table[:down, :right]
    best = int(torch.argmax(sums).item())
    row, col = divmod(best, right)
    return Block(row, col, rows, cols, float(sums[row, col].item()))


def lora_factors(block: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B = U_r Σ_r [out, r], A = V_r^T [r, in]) in float32: B @ A is the best rank-r approximation of
    `block` (Eckart–Young), and equals it when r = min(out, in)."""
    if not 1 <= rank <= min(block.shape):
        raise ValueError(f"LoRA rank {rank} must lie in 1..{min(block.shape)} for a {tuple(block.shape)} block")
    u, s, vh = torch.linalg.svd(block.to(torch.float32), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank].contiguous()


def student_weight_shapes(student_config, modules: Sequence[str]) -> tuple[int, dict[str, tuple[int, int]]]:
    """(depth, {module: (out, in)}) of a student from its config alone: the model is built on the meta
    device, so no weight is read or allocated and any architecture `target_weights` handles works."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student_config)
    weights = target_weights(model, modules)
    return len(decoder_layers(model)), {module: tuple(weights[(0, module)].shape) for module in modules}


@dataclass
class SeekingResult:
    """What the extra caches: LoRA factors per (student layer, module) and how they were chosen."""

    factors: dict[str, np.ndarray]
    teacher_layers: list[int]
    layer_sensitivity: list[float]
    blocks: dict[str, dict] = field(default_factory=dict)


def extract_factors(teacher: nn.Module, examples: Iterable, student_layers: int,
                    student_shapes: dict[str, tuple[int, int]], rank: int,
                    progress: bool = False) -> tuple[SeekingResult, Sensitivity]:
    """The whole teacher side: sensitivity, layer choice, best blocks and their rank-`rank` factors."""
    modules = list(student_shapes)
    weights = target_weights(teacher, modules)
    check_pair(len(decoder_layers(teacher)), {m: tuple(weights[(0, m)].shape) for m in modules}, student_layers,
               student_shapes)
    sensitive = sensitivity(teacher, examples, modules, progress)
    totals = sensitive.layer_totals(len(decoder_layers(teacher)))
    chosen = select_layers(totals, student_layers)
    result = SeekingResult({}, chosen, totals.tolist())
    for student_layer, teacher_layer in enumerate(chosen):
        for module in modules:
            scored = sensitive.scores[(teacher_layer, module)]
            rows, cols = student_shapes[module]
            block = best_subblock(scored, rows, cols)
            teacher_block = block.of(weights[(teacher_layer, module)].detach()).to(torch.float32)
            b, a = lora_factors(teacher_block, rank)
            result.factors[factor_key(student_layer, module, "lora_B")] = b.cpu().numpy()
            result.factors[factor_key(student_layer, module, "lora_A")] = a.cpu().numpy()
            kept = (b @ a).square().sum().item() / max(teacher_block.square().sum().item(), 1e-30)
            result.blocks[f"layers.{student_layer}.{module}"] = {
                "teacher_layer": teacher_layer, "row": block.row, "col": block.col, "shape": [rows, cols],
                "sensitivity_share": block.total / max(scored.sum(dtype=torch.float64).item(), 1e-30),
                "energy_kept": kept}
    return result, sensitive


def check_pair(teacher_layers: int, teacher_shapes: dict[str, tuple[int, int]], student_layers: int,
               student_shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse, before any backward pass, a student that is deeper or wider than the teacher: Seeking
    only selects layers and shrinks weights."""
    if student_layers > teacher_layers:
        raise ValueError(f"the student has {student_layers} layers, the teacher {teacher_layers}: Seeking keeps "
                         "L_S teacher layers, so the student must not be deeper than the teacher")
    for module, (rows, cols) in student_shapes.items():
        height, width = teacher_shapes[module]
        if rows > height or cols > width:
            raise ValueError(f"the student's {module} is {(rows, cols)}, the teacher's {(height, width)}: Seeking "
                             "only shrinks weights, so the student must not be wider than the teacher")


def seed_examples(config: PktConfig, settings: SeekingConfig, data_path: Path, tokenizer) -> list:
    """The first `methods.seeking.teacher.seed_examples` cached examples, supervised where the sensitivity's loss is:
    on the answers (`sensitivity_tokens: answer`) or as the cache supervises them (`supervised`)."""
    cfg = config.extract
    # The cache holds only the first `extract.limit` rows: seed examples come from those.
    limits = [n for n in (settings.seed_examples, cfg.limit) if n > 0]
    every_token = settings.sensitivity_tokens == "supervised" and cfg.train_on_inputs
    examples, _ = load_examples(data_path, tokenizer, cfg.prompt_format, cfg.max_length, every_token,
                                limit=min(limits) if limits else None)
    return examples


def student_config_of(config: PktConfig):
    """The student's config (never its weights: stage one does not load the student)."""
    from ...models import load_model_config

    return load_model_config(config.student, config.runtime.trust_remote_code, needed_for=(
        "`pkt extract --with seeking` needs the student, whose shape sets the blocks it factorises: pass "
        "--student (or set `student`)"))


class SeekingExtra(TeacherExtra):
    """`pkt extract --with seeking`: LoRA factors of the teacher's most sensitive blocks, for the student.

    Reads the seed examples from the cached data (`methods.seeking.teacher.seed_examples`, first N, masked by
    `methods.seeking.teacher.sensitivity_tokens`), the student's shape from its config (`student`), the modules
    and default rank from `align.lora`."""

    def inputs(self, config: PktConfig) -> dict:
        return {"seeking": dataclasses.asdict(self.settings), "student": str(config.student),
                "lora_r": config.align.lora.r, "lora_target_modules": list(config.align.lora.target_modules)}

    def compute(self, teacher, tokenizer, config: PktConfig, data_path: Path, progress: bool) -> ExtraOutput:
        settings = self.settings
        if settings.seed_examples < 0:
            raise ValueError(f"methods.seeking.teacher.seed_examples must be >= 0, got {settings.seed_examples}")
        if settings.rank < 0:
            raise ValueError(f"methods.seeking.teacher.rank must be >= 0 (0 means align.lora.r), got {settings.rank}")
        rank = settings.rank or config.align.lora.r
        modules = list(config.align.lora.target_modules)
        depth, shapes = student_weight_shapes(student_config_of(config), modules)
        for module, shape in shapes.items():
            if rank > min(shape):
                raise ValueError(f"methods.seeking.teacher.rank {rank} exceeds the student's {module} {shape}; lower it")
        examples = seed_examples(config, settings, data_path, tokenizer)
        result, sensitive = extract_factors(teacher, examples, depth, shapes, rank, progress)
        provenance = {
            "teacher_layers": result.teacher_layers,
            "layer_sensitivity": result.layer_sensitivity,
            "modules": modules,
            "rank": rank,
            "factors": "B = U_r S_r [out, r], A = V_r^T [r, in], unscaled: B @ A is the block's rank-r SVD",
            "seed_examples": sensitive.examples,
            "sensitivity_tokens": settings.sensitivity_tokens,
            "skipped_examples": sensitive.skipped,
            "data": str(data_path),
            "student": {"id": str(config.student), "layers": depth,
                        "shapes": {module: list(shape) for module, shape in shapes.items()}},
            "blocks": result.blocks,
        }
        return ExtraOutput({key: value.astype(np.float32) for key, value in result.factors.items()}, provenance)

