"""The residual stream h_0..h_L of a decoder, with h_L the last decoder layer's raw output.

transformers returns `hidden_states[L]` *after* the final norm (it equals `last_hidden_state`), so
`hidden_states[L] - hidden_states[L-1]` is not what layer L added to the stream: on random pairs of
the real widths its cosine with the true contribution was 0.45-0.92. Every residual contribution
pkt computes (the teacher capture, the loader's derived deltas, the student's frontier state)
therefore reads h_L from a hook on the last decoder layer. The normed state stays one RMSNorm away:
the cache holds the teacher's final norm, the student has its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (`PeftModel.get_base_model()`), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`Qwen2Model`, ...) of a causal LM, a peft-wrapped one, or the decoder itself."""
    base = unwrapped(model)
    return base.get_decoder() if hasattr(base, "get_decoder") and not hasattr(base, "layers") else base


def residual_delta(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Δ_l = h_l − h_(l−1), what layer l added to the stream, subtracted in float32.

    The result stays float32 so a caller that stores it rounds once, into the storage dtype;
    `.to(current.dtype)` gives what a half-precision model's own subtraction gives."""
    return current.float() - previous.float()


@contextmanager
def last_layer_output(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `model` appends its last decoder layer's output [B, T, D]."""
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    outputs: list[torch.Tensor] = []

    def keep(module, inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = layers[-1].register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


def residual_stream(hidden_states: tuple[torch.Tensor, ...], last_output: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`hidden_states` with its last (normed) entry replaced by the raw output `last_layer_output` caught.

    The first output the hook caught is the one of this forward (gradient checkpointing runs the layer
    again in backward, appending a recomputation that is never read).
    """
    if not last_output:
        raise RuntimeError("the last decoder layer did not run: was the forward inside last_layer_output()?")
    return (*hidden_states[:-1], last_output[0])


def forward_with_residual_stream(module: nn.Module, **inputs) -> tuple[object, tuple[torch.Tensor, ...]]:
    """`module(**inputs, output_hidden_states=True)` and its residual stream h_0..h_L (h_L raw)."""
    with last_layer_output(module) as caught:
        output = module(**inputs, output_hidden_states=True)
    return output, residual_stream(output.hidden_states, caught)


def layer_state(states: tuple[torch.Tensor, ...], layer: int, kind: str) -> torch.Tensor:
    """What a cache's `kind` array holds for `layer`: its output h_layer, or its contribution h_layer - h_(layer-1)."""
    if kind == "hidden":
        return states[layer]
    if kind != "delta" or layer < 1:
        raise ValueError(f"no {kind!r} state of layer {layer}: kinds are hidden (layer >= 0) and delta (layer >= 1)")
    return residual_delta(states[layer], states[layer - 1]).to(states[layer].dtype)
