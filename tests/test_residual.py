"""The student's residual stream: h_L is the last decoder layer's raw output, so Δ_L is its contribution."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pkt_pipeline.loader import Batch
from pkt_pipeline.methods.base import forward_student
from pkt_pipeline.models import load_model
from pkt_pipeline.residual import decoder_of, layer_state, residual_delta, unwrapped


def _batch(vocab: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 0
    return Batch(["a", "b"], input_ids, attention_mask, attention_mask.bool(), {}, None, None)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "lora"])
def test_student_last_layer_state_is_the_raw_output_of_its_last_layer(tiny_pair, wrapped):
    model = load_model(tiny_pair["student"], dtype="float32")
    if wrapped:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    decoder = (model.get_base_model() if wrapped else model).model
    last = len(decoder.layers)
    caught = {}
    decoder.layers[-1].register_forward_hook(lambda module, args, output: caught.setdefault("h_L", output))
    decoder.layers[-2].register_forward_hook(lambda module, args, output: caught.setdefault("h_L-1", output))
    batch = _batch(model.config.vocab_size)

    states = forward_student(model, batch, hidden_states=True).hidden_states
    assert len(states) == last + 1
    torch.testing.assert_close(states[last], caught["h_L"], rtol=0, atol=0)
    torch.testing.assert_close(layer_state(states, last, "delta"), caught["h_L"] - caught["h_L-1"], rtol=0, atol=0)
    # Not the normed state transformers returns as hidden_states[L].
    normed = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert not torch.allclose(states[last], normed, atol=1e-3)
    torch.testing.assert_close(decoder.norm(states[last]), normed)


def test_layer_state_refuses_what_no_cache_holds():
    states = tuple(torch.zeros(1, 2, 3) for _ in range(3))
    with pytest.raises(ValueError, match="no 'delta' state of layer 0"):
        layer_state(states, 0, "delta")
    with pytest.raises(ValueError, match="no 'raw' state"):
        layer_state(states, 1, "raw")


def test_residual_delta_is_the_float32_difference_of_consecutive_states():
    current = torch.tensor([[1.5, -2.0, 3.0]], dtype=torch.bfloat16)
    previous = torch.tensor([[0.25, 1.0, 3.0]], dtype=torch.bfloat16)
    delta = residual_delta(current, previous)
    assert delta.dtype == torch.float32
    assert delta.tolist() == [[1.25, -3.0, 0.0]]


def test_decoder_of_and_unwrapped_see_through_peft(tiny_pair):
    model = load_model(tiny_pair["student"], dtype="float32")
    wrapped = get_peft_model(load_model(tiny_pair["student"], dtype="float32"), LoraConfig(r=4, target_modules=["q_proj"]))
    assert unwrapped(model) is model
    assert unwrapped(wrapped) is wrapped.base_model.model
    assert decoder_of(model) is model.model
    assert decoder_of(wrapped) is wrapped.base_model.model.model
    assert decoder_of(model.model) is model.model
