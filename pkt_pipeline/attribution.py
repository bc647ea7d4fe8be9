"""Layer Gradient × Activation attribution on the teacher (METHOD.md §1.3, stage A).

For one example with token ids `x` and an answer mask `supervised`, the loss is the teacher's
mean cross-entropy over the supervised tokens in the Hugging Face label convention: the
logits at position t-1 predict token t, so a supervised token at t contributes
CE(logits[t-1], x[t]) and a supervised token at position 0 contributes nothing. The score of
layer ℓ (ℓ = 0 is the embedding output, ℓ = L the last layer) is

    I_ℓ = Σ_t Σ_j | ∂L/∂h_ℓ[t,j] · h_ℓ[t,j] |        ("abs", the default)
    I_ℓ = Σ_t Σ_j   ∂L/∂h_ℓ[t,j] · h_ℓ[t,j]          ("signed", the METHOD.md option)

with h_ℓ the residual stream: `hidden_states[ℓ]` for ℓ < L and the last decoder layer's raw
output for ℓ = L (`residual.py`; transformers' `hidden_states[L]` is after the final norm), the
states the cache holds.

The same pass scores every layer's *contribution* Δ_ℓ = h_ℓ − h_{ℓ−1} (Δ_0 = h_0):

    C_ℓ = Σ_t Σ_j | ∂L/∂h_ℓ[t,j] · Δ_ℓ[t,j] |         (signed: without the | |)

∂L/∂h_ℓ is also ∂L/∂Δ_ℓ, so signed C_ℓ is the first-order change of the loss were layer ℓ's
addition removed. I_ℓ grows with depth as the stream does (an argmax over a window sits at its
deep edge); C_ℓ measures what a layer itself adds, which is what SemAlign's pairing wants.

Notes on the definition:

- The sum runs over all positions t. In a causal model ∂L/∂h_ℓ[t] is exactly zero at every
  position after the last predicting position (t ≥ last supervised token), since nothing
  there feeds the loss; earlier unsupervised positions do feed it through attention, and
  their share is the point of the gradient. Summing over all positions is therefore the
  same as summing over the positions that feed the loss, with no mask to get wrong.
- Each example is one forward and one backward pass. The gradient is taken with
  `torch.autograd.grad` with respect to the hidden states only; parameters are switched to
  `requires_grad=False` for the call and restored afterwards, so no `.grad` is created or
  changed on the model. The model is put in eval mode for the call (no dropout) and its
  previous mode restored.
- The loss is computed from float32 logits and the grad·activation product in float32
  whatever the model dtype (the product is cast, not the model); the sums are float64.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .extraction import check_finite
from .models import input_device
from .residual import forward_with_residual_stream, residual_delta

log = logging.getLogger(__name__)

AGGREGATIONS = ("abs", "signed")
TARGETS = ("output", "contribution")
"""What a score multiplies the gradient with: the layer's output h_ℓ, or its contribution Δ_ℓ."""


def _check_inputs(input_ids: torch.Tensor, supervised: torch.Tensor, aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown attribution aggregation {aggregation!r} (choose one of {', '.join(AGGREGATIONS)})")
    if input_ids.dim() != 1 or supervised.dim() != 1:
        raise ValueError(
            f"input_ids and supervised must be 1-D (one example), got shapes "
            f"{tuple(input_ids.shape)} and {tuple(supervised.shape)}"
        )
    if input_ids.shape != supervised.shape:
        raise ValueError(
            f"input_ids and supervised differ in length: {input_ids.shape[0]} vs {supervised.shape[0]}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if supervised.dtype != torch.bool:
        raise ValueError(f"supervised must be a bool mask, got {supervised.dtype}")
    if not has_effective_supervision(supervised):
        raise ValueError(
            "example has no supervised token to predict (supervised is empty or marks only "
            "position 0, which no logit predicts); filter such examples out"
        )


def has_effective_supervision(supervised) -> bool:
    """True when some supervised token sits at position ≥ 1, i.e. the LM loss has a term."""
    return bool(supervised[1:].any())


def attribution_scores(
    model: nn.Module, input_ids: torch.Tensor, supervised: torch.Tensor, aggregation: str = "abs"
) -> dict[str, torch.Tensor]:
    """Per-layer Gradient × Activation scores of one example for both targets from one forward and
    backward: {"output": I_ℓ, "contribution": C_ℓ}, each float64 of shape [L+1] (CPU).

    `input_ids` [T] integer ids, `supervised` [T] bool answer-token mask. Raises ValueError for
    an unknown `aggregation`, malformed inputs, or an example with no supervised token at
    position ≥ 1 (nothing to predict). See the module docstring for the exact definition.
    """
    input_ids = torch.as_tensor(input_ids)
    supervised = torch.as_tensor(supervised)
    _check_inputs(input_ids, supervised, aggregation)

    device = input_device(model)
    ids = input_ids.to(device=device, dtype=torch.long).unsqueeze(0)
    mask = supervised.to(device)
    # Targets in the HF convention: logits[t-1] predict ids[t] for supervised t ≥ 1.
    predict = mask[1:]
    targets = ids[0, 1:][predict]

    was_training = model.training
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            # The embedding output is the one leaf that needs a gradient: every hidden state
            # downstream of it then sits on the graph.
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            output, hidden = forward_with_residual_stream(
                model, inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=False)
            logits = output.logits[0, :-1][predict].float()
            loss = F.cross_entropy(logits, targets)
            grads = torch.autograd.grad(loss, hidden)
        scores = {target: torch.empty(len(hidden), dtype=torch.float64) for target in TARGETS}
        previous = None
        for layer, (h, g) in enumerate(zip(hidden, grads)):
            h, g = h.detach().to(device).float(), g.detach().to(device).float()  # a split teacher's h_L is elsewhere
            for target, activation in (("output", h), ("contribution", h if previous is None else residual_delta(h, previous))):
                product = g * activation
                if aggregation == "abs":
                    product = product.abs()
                scores[target][layer] = product.sum(dtype=torch.float64).item()
            previous = h
        return scores
    finally:
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
        model.train(was_training)


def accumulate_attribution(
    model: nn.Module, examples: Iterable, aggregation: str = "abs", progress: bool = True
) -> tuple[dict[str, np.ndarray], int]:
    """Σ of `attribution_scores` over `examples`; returns ({target: scores float64 [L+1]}, n_used).

    `examples` yields objects with `.input_ids` (integer numpy array) and `.supervised` (bool
    numpy array). Examples with no supervised token at position ≥ 1 are skipped and counted
    (a warning logs how many). Raises ValueError for an unknown aggregation or when no
    example at all has a supervised token.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown attribution aggregation {aggregation!r} (choose one of {', '.join(AGGREGATIONS)})")
    total: dict[str, torch.Tensor] | None = None
    supervised_examples = SupervisedExamples(examples, "attribution", progress)
    for input_ids, supervised in supervised_examples:
        scores = attribution_scores(model, input_ids, supervised, aggregation)
        check_finite(scores, getattr(supervised_examples.current, "example_id", f"#{supervised_examples.used}"),
                     what="attribution ")
        total = scores if total is None else {target: total[target] + scores[target] for target in TARGETS}
    if supervised_examples.skipped:
        log.warning("attribution skipped %d example(s) with no supervised token", supervised_examples.skipped)
    if total is None:
        raise ValueError(f"no example with a supervised token to attribute ({supervised_examples.skipped} skipped)")
    return {target: scores.numpy() for target, scores in total.items()}, supervised_examples.used


class SupervisedExamples:
    """The examples that give the LM loss a term, as (input_ids int64, supervised bool) tensors behind a
    progress bar. The others are passed over and counted in `skipped`; `used` counts those consumed.

    `examples` yields objects with `.input_ids` and `.supervised` numpy arrays (as `examples.Example`).
    """

    def __init__(self, examples: Iterable, desc: str, progress: bool = True):
        self.examples, self.desc, self.progress = examples, desc, progress
        self.used = self.skipped = 0
        self.current = None  # the example last yielded, for messages that name it

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from tqdm.auto import tqdm

        for example in tqdm(self.examples, desc=self.desc, unit="ex", disable=not self.progress):
            supervised = torch.from_numpy(np.asarray(example.supervised, dtype=bool))
            if not has_effective_supervision(supervised):
                self.skipped += 1
                continue
            self.current = example
            yield torch.from_numpy(np.asarray(example.input_ids).astype(np.int64)), supervised
            self.used += 1
