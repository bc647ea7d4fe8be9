"""Write a Hugging Face Qwen2 model and its byte-level BPE tokenizer as a GGUF file.

Used only by tests, to produce a GGUF of the tiny model that goes through the same
transformers GGUF loader as the real pinned models. Tensor names come from the gguf
package's own name map; 2-D weights can be quantized to Q8_0 so the dequantization path
runs as it does for the Q4 real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np


def export_qwen2_gguf(model_dir: Path, out_file: Path, quantize_q8: bool = True) -> Path:
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))

    writer = gguf.GGUFWriter(str(out_file), "qwen2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    vocab = tokenizer["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = [None] * config["vocab_size"]
    for token, index in {**vocab, **added}.items():
        tokens[index] = token
    token_types = [gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(added[tokenizer_config["eos_token"]])
    writer.add_pad_token_id(added[tokenizer_config["pad_token"]])
    writer.add_add_bos_token(False)
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])
    elif (model_dir / "chat_template.jinja").is_file():
        writer.add_chat_template((model_dir / "chat_template.jinja").read_text())

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    for hf_name, array in tensors.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        array = array.astype(np.float32)
        if quantize_q8 and array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_shape=gguf.quants.quant_shape_to_byte_shape(array.shape, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
