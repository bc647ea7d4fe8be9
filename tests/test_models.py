"""Model loading: the three kinds of source, the dtype policy and the bad paths."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import resource
import subprocess
import sys
import typing

import pytest
import torch

from conftest import real_model_dir
from pkt_pipeline.config import LoraSettings
from pkt_pipeline.models import (
    ModelLoadError,
    cpu_supports_bf16,
    is_quantized,
    load_model,
    load_tokenizer,
    peak_rss_gib,
    resolve_dtype,
    resolve_source,
    with_lora,
)

PROMPT = "def add(a, b):\n    return a + b"


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def test_tiny_pair_differs_in_shape_and_shares_tokenizer(tiny_pair):
    teacher = load_model(tiny_pair["teacher"], dtype="float32")
    student = load_model(tiny_pair["student"], dtype="float32")
    assert (teacher.config.num_hidden_layers, teacher.config.hidden_size) == (4, 64)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 32)
    t_tok, s_tok = load_tokenizer(tiny_pair["teacher"]), load_tokenizer(tiny_pair["student"])
    assert t_tok.get_vocab() == s_tok.get_vocab()
    assert teacher.config.vocab_size == student.config.vocab_size == len(t_tok)
    assert "<|im_start|>assistant" in t_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_local_directory_loads_with_requested_dtype(tiny_pair):
    model = load_model(tiny_pair["student"], dtype="float32", device="cpu")
    assert model.dtype == torch.float32 and not model.training
    assert resolve_source(tiny_pair["student"]).kind == "dir"


def test_gguf_loads_dequantized_with_quantizer_flags_cleared(tiny_pair, tiny_teacher_gguf, tmp_path):
    reference = load_model(tiny_pair["teacher"], dtype="float32")
    model = load_model(tiny_teacher_gguf, dtype="float32")
    tokenizer = load_tokenizer(tiny_teacher_gguf)
    assert resolve_source(tiny_teacher_gguf).kind == "gguf"
    assert not is_quantized(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Q8_0 keeps about 2-3 significant digits: logits agree with the float original to that.
    reference_logits = _logits(reference, load_tokenizer(tiny_pair["teacher"]))
    assert torch.allclose(_logits(model, tokenizer), reference_logits, atol=0.05 * reference_logits.abs().max())

    # Cleared flags are what make a GGUF model savable and trainable.
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved", dtype="float32")
    assert torch.equal(_logits(reloaded, tokenizer), _logits(model, tokenizer))

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["v_proj", "o_proj"]))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable
    loss = peft_model(tokenizer(PROMPT, return_tensors="pt").input_ids, labels=tokenizer(PROMPT, return_tensors="pt").input_ids).loss
    loss.backward()
    assert all(p.grad is not None for p in trainable)


def test_plain_transformers_gguf_load_is_marked_quantized(tiny_teacher_gguf):
    """Why `clear_quantizer_flags` exists: without it the dequantized model refuses to save."""
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(tiny_teacher_gguf.parent, gguf_file=tiny_teacher_gguf.name)
    assert is_quantized(raw)


def test_hub_id_offline_gives_clear_error():
    # A fresh interpreter, so the hub library reads HF_HUB_OFFLINE at import as it does for users.
    code = (
        "from pkt_pipeline.models import load_model, ModelLoadError\n"
        "try:\n    load_model('pkt-no-such-org/no-such-model')\n"
        "except ModelLoadError as exc:\n    print(exc)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "hub id 'pkt-no-such-org/no-such-model'" in result.stdout
    assert "offline" in result.stdout and "pkt assets fetch" in result.stdout


@pytest.mark.parametrize("reference", ["./no/such/dir", "/no/such/model", "missing-model.gguf", "a/b/c"])
def test_missing_paths_name_the_path(reference):
    with pytest.raises(ModelLoadError, match="model not found: .*does not exist"):
        load_model(reference)


def test_path_under_existing_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="models/qwen does not exist"):
        load_model("models/qwen")


def test_directory_without_config_points_at_its_gguf(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json.*weights.gguf"):
        load_model(tmp_path)


def test_other_file_kinds_are_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        load_model(path)


def test_unreadable_gguf_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=f"could not read the model at {path}"):
        load_model(path)


def test_corrupt_safetensors_names_the_directory(tiny_pair, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_pair["student"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match=f"could not read the model at {broken}"):
        load_model(broken)


def test_remote_code_is_not_run_unless_asked(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "remote-code-ran"
    custom = tmp_path / "custom"
    custom.mkdir()
    config = json.loads((tiny_pair["student"] / "config.json").read_text())
    config["model_type"] = "pkt-custom-arch"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelLoadError, match=f"could not read the model at {custom}"):
        load_model(custom)
    assert not marker.exists()
    with pytest.raises(Exception):
        load_model(custom, trust_remote_code=True)
    assert marker.exists(), "with trust_remote_code=True the repository's code is imported"


def test_dtype_policy():
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(ValueError, match="unknown floating-point dtype 'int8'"):
        resolve_dtype("int8")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_real_qwen_completes_code_sensibly(name):
    from transformers import AutoModelForCausalLM

    path = real_model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(path)
    messages = [{"role": "user", "content": "Write a Python function is_even(n) that returns True when n is even."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=128, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "def is_even" in text and "% 2" in text


def test_peak_rss_is_ru_maxrss_in_gib_rounded_as_recorded():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    exact = peak_rss_gib(None)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert before <= exact <= after and exact > 0
    assert peak_rss_gib() in (round(before, 2), round(after, 2))
    assert peak_rss_gib(0) == round(peak_rss_gib(None))


def test_with_lora_wraps_the_model_as_align_lora_says(tiny_pair):
    model = with_lora(load_model(tiny_pair["student"], dtype="float32"),
                      LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["v_proj", "o_proj"]))
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, sorted(lora.target_modules)) == (4, 8, ["o_proj", "v_proj"])
    trainable = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"v_proj", "o_proj"}


ANNOTATED = ("models", "training", "losses", "examples", "residual", "attribution")
"""Modules whose public signatures must say what `model`, `tokenizer` and `echo` are."""


def type_hints(module, function) -> dict[str, object]:
    """`function`'s annotations resolved as a type checker sees them, `if TYPE_CHECKING:` imports included."""
    namespace = dict(vars(module))
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            exec(compile(ast.Module(node.body, []), module.__file__, "exec"), namespace)
    return typing.get_type_hints(function, globalns=namespace)


def test_public_signatures_annotate_model_tokenizer_and_echo():
    unannotated, checked = [], 0
    for name in ANNOTATED:
        module = importlib.import_module(f"pkt_pipeline.{name}")
        functions = [(f"{name}.{attr}", value) for attr, value in vars(module).items()
                     if inspect.isfunction(value) and value.__module__ == module.__name__ and not attr.startswith("_")]
        functions += [(f"{name}.{cls}.{attr}", value) for cls, owner in vars(module).items()
                      if inspect.isclass(owner) and owner.__module__ == module.__name__ and not cls.startswith("_")
                      for attr, value in vars(owner).items() if inspect.isfunction(value) and not attr.startswith("_")]
        for qualified, function in functions:
            hints = type_hints(module, function)
            for parameter in inspect.signature(function).parameters:
                if parameter in ("model", "tokenizer", "echo"):
                    checked += 1
                    if parameter not in hints:
                        unannotated.append(f"{qualified}({parameter})")
    assert unannotated == [] and checked >= 10
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pkt_pipeline import models

    assert type_hints(models, models.load_model)["return"] is PreTrainedModel
    assert type_hints(models, models.load_tokenizer)["return"] is PreTrainedTokenizerBase
