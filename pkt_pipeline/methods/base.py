"""What a stage-two method is: phases of training, what trains in each, and a loss per batch.

The trainer (`pkt_pipeline.training`) owns everything else: the loop, the optimizer, the loader,
checkpoints and logs. A method only says *what* to optimise, so SemAlign's frontier schedule and a
one-phase baseline run on the same loop, data and budget, and comparisons stay fair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import get_scheduler

from ..cache import Cache, CacheError
from ..config import AlignConfig
from ..loader import TOKEN_MASKS, Batch, BatchSource
from ..losses import next_token_mask, topk_kl
from ..residual import decoder_of, forward_with_residual_stream, unwrapped


LR_SCHEDULES = {"linear": "linear", "constant": "constant_with_warmup"}
"""A phase's `lr_schedule` -> the transformers scheduler it names."""


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one trainable set and one loss (a frontier stage, or a whole run)."""

    name: str
    steps: int
    teacher_layers: tuple[int, ...] = ()
    """Cached teacher layers the loader reads for this phase."""
    student_layer: int | None = None
    """The frontier layer (1..L_S) for layer-wise methods."""
    lr_schedule: str = "linear"
    """The learning rate over the phase, after the warm-up: `linear` decay to 0, or `constant`."""


@dataclass(frozen=True)
class LayerNeed:
    """The cached teacher layers a method reads, known before any cache exists (`extract.layers: auto`)."""

    layers: frozenset[int]
    """Teacher layers 1..L_T it may pair, a superset where the pairing depends on the cache's attribution."""
    kind: str
    """`hidden` or `delta`: a delta not captured as such is derived from the layer and its predecessor."""
    rule: str
    """How the layers follow from the settings and the depths, in words (recorded in the manifest)."""


@dataclass
class StudentOutputs:
    """A student forward, with logits only where a loss needs them (the LM head is 25% of a small
    model's compute at a 150k vocabulary; answers are a fraction of the tokens)."""

    hidden_states: tuple[torch.Tensor, ...] | None
    """The residual stream h_0..h_L, [B, T, D] each; h_L is the last layer's raw (pre-norm) output."""
    logits: torch.Tensor
    """[N, V] at the positions of `positions`, in row-major order."""
    positions: torch.Tensor
    """[B, T] bool: the positions whose next token is scored (`tokens` of `forward_student`)."""
    targets: torch.Tensor
    """[N] the next-token ids at those positions."""


@dataclass
class AlignContext:
    """What a method may use: the cache (never the teacher), the student's tokenizer, the config."""

    cache: Cache
    config: AlignConfig
    tokenizer: object
    extras: dict = field(default_factory=dict)
    settings: Any = None
    """The method's own settings (its registered config class, from `methods.<name>`): see `methods.resolve`."""


class Method:
    """Base of the registered stage-two methods. Subclasses override `loss`; `register` sets `name`."""

    name: ClassVar[str] = ""
    uses_lora: ClassVar[bool] = True
    needs_topk: ClassVar[bool] = False
    needs_target_logprob: ClassVar[bool] = False
    """True: batches carry the teacher's log-prob of each next token in the text (`Batch.target_logprob`), and
    `pkt align` refuses a cache without it before training."""
    cross_tokenizer: ClassVar[bool] = False
    """True for a method that trains a student with another tokenizer than the cache's teacher: `pkt align` then
    accepts one, and every batch carries the student's own tokens aligned with the teacher's (`Batch.student`,
    `pkt_pipeline.xtok`). False (the default): the student must share the teacher's vocabulary."""
    teacher_kind: ClassVar[str] = "hidden"
    """Which cached teacher arrays the phases read: `hidden` or `delta`."""
    frozen_student: ClassVar[bool] = False
    """True when no student weight trains: the student then stays in the runtime dtype (bf16 on most
    hardware) instead of float32 master weights."""
    micro_batch_size: ClassVar[int] = 0
    """Used when `align.micro_batch_size` is 0; 0 means the whole batch in one forward."""
    report_file: ClassVar[str] = "report.json"
    """Where `pkt align --report-map` writes what `report` returns, in `align.out`."""

    def __init__(self, context: AlignContext):
        self.context = context
        self.config = context.config
        self.settings = context.settings
        if self.config.output_tokens not in TOKEN_MASKS:
            raise ValueError(f"align.output_tokens must be one of {TOKEN_MASKS}, got {self.config.output_tokens!r}")
        if self.config.output_tokens == "answer":
            require_answer_mask(context.cache, "align.output_tokens")

    def setup(self, model: nn.Module) -> None:
        """Called once with the (LoRA-wrapped) student before training, e.g. to build fixed maps."""

    @classmethod
    def layer_need(cls, settings: Any, teacher_layers: int, student_layers: int) -> LayerNeed | None:
        """The cached teacher layers this method's phases read, from its settings and the two depths alone;
        None, the default, when it reads none (top-k, tokens and teacher extras only)."""
        return None

    def phases(self, total_steps: int, student_layers: int) -> list[Phase]:
        """The schedule; one phase over the whole budget unless a method needs more."""
        return [Phase(self.name, total_steps)]

    def trainable(self, model: nn.Module, phase: Phase) -> list[str]:
        """Names of the parameters that train in `phase`; every LoRA parameter by default."""
        return [name for name, _ in model.named_parameters() if "lora_" in name]

    def saved_parameters(self, model: nn.Module, phases: list[Phase]) -> list[str]:
        """Parameters a checkpoint must hold: everything any phase trains."""
        names: dict[str, None] = {}
        for phase in phases:
            names.update(dict.fromkeys(self.trainable(model, phase)))
        return list(names)

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """A phase's optimizer: AdamW at `align.lr` and `align.weight_decay`, unless the method publishes another."""
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, phase: Phase) -> torch.optim.lr_scheduler.LRScheduler:
        """A phase's learning-rate schedule: `phase_scheduler` with the configured warm-up."""
        return phase_scheduler(optimizer, phase, warmup_steps(self.config, phase.steps))

    def loss(self, model: nn.Module, batch: Batch, phase: Phase) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise and its named parts (logged per step)."""
        raise NotImplementedError

    def loss_units(self, batch: Batch, phase: Phase) -> dict[str, int]:
        """How `loss` is normalised: what each of its means runs over, counted in `batch`, by unit name.

        When the trainer cuts a batch into micro-batches it weights each by its share of these units, so
        the micro-batched gradient is the whole batch's. The default is one mean over the tokens scored
        under `align.output_tokens`, which cross-entropy and the top-k KL take."""
        return {"output_tokens": int(next_token_positions(batch, self.config.output_tokens)[0].sum())}

    def weighted_loss(self, model: nn.Module, batch: Batch, phase: Phase,
                      shares: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """`loss` of a micro-batch holding `shares` (unit -> fraction) of its batch's `loss_units`, and its
        parts, weighted so that the micro-batches' sum is the batch's. A method whose loss adds means over
        different units weights each term by its own share."""
        (share,) = shares.values()
        loss, parts = self.loss(model, batch, phase)
        return loss * share, {key: value * share for key, value in parts.items()}

    def loader(self, phase: Phase, seed: int) -> BatchSource | None:
        """Batches for `phase` when the method makes its own (from a teacher extra, say); None, the default,
        means the cache loader."""
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        """The model to save once training is done; a method whose training edits live outside the
        weights (hooks, a hypernetwork) writes them into the weights here."""
        return model

    def report(self, model: nn.Module, make_loader: Callable[[Phase], Any], when: str,
               so_far: dict | None) -> dict | None:
        """Diagnostics written to `report_file` with `align.report_map` (`pkt align --report-map`): called
        with `when="before"` training (`so_far` None) and `"after"` it (`so_far` the first call's result),
        returning the JSON-able report so far. None, the default, means the method writes no report."""
        return None

    def run_metrics(self) -> dict:
        """What the method measured of its setup, added to the run's `metrics.json`; none by default."""
        return {}

    @classmethod
    def format_report(cls, report: dict) -> list[str]:
        """Lines `pkt align` prints for a report `report` returned; none by default."""
        return []


def require_answer_mask(cache: Cache, setting: str) -> None:
    """Refuse, before any training, a setting that needs the answer mask on a cache that lacks it."""
    if not cache.has_answer_mask:
        raise CacheError(f"{setting}=answer needs the answer mask, which the cache at {cache.files.url} predates: "
                         "re-extract it (`pkt extract --overwrite`), or use `supervised`")


def warmup_steps(config: AlignConfig, steps: int) -> int:
    """Warm-up steps of a phase of `steps`: `align.warmup_steps`, else `align.warmup_ratio` of the phase."""
    return min(steps, config.warmup_steps or math.ceil(config.warmup_ratio * steps))


def phase_scheduler(optimizer: torch.optim.Optimizer, phase: Phase, warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm-up over `warmup` steps, then the phase's `lr_schedule` shape."""
    if phase.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"phase {phase.name!r}: lr_schedule must be one of {list(LR_SCHEDULES)}, got {phase.lr_schedule!r}")
    return get_scheduler(LR_SCHEDULES[phase.lr_schedule], optimizer, num_warmup_steps=min(warmup, phase.steps),
                         num_training_steps=max(phase.steps, 1))


def next_token_positions(batch: Batch, tokens: str = "supervised") -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] positions whose next token is one of `tokens` (`Batch.tokens_mask`), [N] those next-token ids)."""
    supervised_next = next_token_mask(batch.tokens_mask(tokens), batch.attention_mask)
    targets = batch.input_ids[:, 1:][supervised_next[:, :-1]]
    return supervised_next, targets


def forward_student(model: nn.Module, batch: Batch, hidden_states: bool = False,
                    tokens: str = "supervised") -> StudentOutputs:
    """Run the student's decoder over the batch and its LM head only where the next token is one of `tokens`."""
    body, head = decoder_of(model), unwrapped(model).get_output_embeddings()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    out, states = forward_with_residual_stream(body, **inputs) if hidden_states else (body(**inputs), None)
    positions, targets = next_token_positions(batch, tokens)
    return StudentOutputs(states, head(out.last_hidden_state[positions]), positions, targets)


def cached_topk_kl(out: StudentOutputs, batch: Batch, mode: str, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at the positions `out` scored, from the cache's top-k log-probs."""
    positions = out.positions
    return topk_kl(out.logits[None], batch.topk_logprobs[positions][None], batch.topk_indices[positions][None],
                   positions.new_ones(1, int(positions.sum())), mode=mode, temperature=temperature)
