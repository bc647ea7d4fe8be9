"""LaTen's locating step (Locate-then-Align, Tan et al., ACL 2025; METHOD.md section 2), and its
teacher side as the stage-one extra `pkt extract --with laten`.

**Scoring.** For one example, the target is the answer's last meaningful token y at position t
(the last supervised, non-special token that is not made only of trailing `." ),]`, space or
newline: the published code strips those characters off the answer's end). Everything is read at
position p = t - 1, the position that predicts y. A component's *score* is the increase of
log p(y) when its write w is added to the residual-stream state r it is added to, both read
through the final norm and the LM head:

    score = log softmax(W_U · N(r + w))[y] - log softmax(W_U · N(r))[y]

with N the final RMSNorm. `readout_norm="final"` (default) divides by the RMS of the position's
*final* residual state, the normaliser the real prediction used, as the published code does (it
freezes the final state's scale); `"own"` applies the RMSNorm to each patched state.

- layer ℓ, attention: r = h_{ℓ-1}[p] (the layer input), w = the attention output (o_proj's output);
- layer ℓ, MLP: r = h_{ℓ-1}[p] + attention output, w = the MLP output (down_proj's output);
- MLP neuron i: r as for the MLP, w = a_i · W_down[:, i], a = act(gate(x)) * up(x), the down_proj input;
- attention neuron n (query head h, dim d; an o_proj column): r = the layer input,
  w = z_n · W_o[:, n], z = the per-head attention output (o_proj's input);
- value neuron j (kv head g, dim d; a v_proj row): w = Σ_{heads h reading g} z_{h,d} · W_o[:, h·hd + d],
  everything value dim j writes. (The published Llama code had no grouped-query attention, so its v
  rows were the o columns; with GQA the v rows are their own neurons, counted on the v width.)

**Selection.** The top L_S layers (L_S = student depth) by attention score carry v/o, those by MLP
score carry up/down, each in depth order: the i-th selected teacher layer feeds student layer i. In
each selected layer, the top k neurons by score, in rank order (rank r of the teacher goes to rank
r of the student): k = int(rate · I_S) MLP neurons (rows of up, columns of down), int(rate · H_S·hd_S)
attention neurons (columns of o) and int(rate · KV_S·hd_S) value neurons (rows of v), at least 1.

**The extra.** Stage one locates `methods.laten.teacher.locate_examples` extract examples (one per
training step) and one injection example (drawn from the cached data), and caches, under
`extras/laten/`, their selected teacher rows/columns, layers, neurons and scores, plus the token ids
and answer masks of those examples and of the align split, so that stage two trains from the cache
alone; the provenance records the extract split's size, the published schedule's length. Only the
student's *shape* is read here (`AutoConfig`), never its weights.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from ...config import PktConfig
from ...datasets import resolve_data
from ...examples import Example, load_examples
from ...residual import decoder_of
from ..teacher import ExtraOutput, TeacherExtra
from .config import LatenExtractConfig, ReadoutNorm

log = logging.getLogger(__name__)

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
MODULE_KIND = {"up_proj": "mlp", "down_proj": "mlp", "v_proj": "v", "o_proj": "o"}
"""Which neurons a module's transferred vectors belong to."""
MODULE_PARENT = {"up_proj": "mlp", "down_proj": "mlp", "v_proj": "self_attn", "o_proj": "self_attn"}
ROW_MODULES = ("up_proj", "v_proj")
"""A neuron of these is a weight row (its input weights); of down/o a column (its output weights)."""
KIND_LAYERS = {"mlp": "mlp", "o": "attention", "v": "attention"}
READOUT_NORMS: tuple[str, ...] = get_args(ReadoutNorm)
TRAILING = ' \n."),]'
"""Characters the published code strips off the answer's end before taking its last token."""


@dataclass(frozen=True)
class ModelShape:
    """What LaTen needs to know of a decoder's geometry."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> ModelShape:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(int(config.num_hidden_layers), int(config.hidden_size), int(config.intermediate_size), heads,
                   int(getattr(config, "num_key_value_heads", None) or heads), int(head_dim))

    @property
    def widths(self) -> dict[str, int]:
        """Neurons per layer of each kind."""
        return {"mlp": self.intermediate, "o": self.heads * self.head_dim, "v": self.kv_heads * self.head_dim}


def neuron_counts(student: ModelShape, rate: float) -> dict[str, int]:
    """Neurons to transfer per layer and kind: `rate` of the student's width, at least one."""
    return {kind: max(1, int(width * rate)) for kind, width in student.widths.items()}


def kinds_of(modules) -> list[str]:
    return sorted({MODULE_KIND[m] for m in modules})


def answer_target(example: Example, tokenizer) -> int | None:
    """Position of the answer's last meaningful token (see the module docstring), or None if none."""
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    for position in np.flatnonzero(example.supervised)[::-1]:
        if position < 1:
            break
        token = int(example.input_ids[position])
        if token not in special and tokenizer.decode([token]).rstrip(TRAILING):
            return int(position)
    return None


def module_of(model, layer: int, module: str) -> torch.nn.Linear:
    """`layers[layer].mlp.up_proj` etc.: the Llama/Qwen/Mistral layout LaTen is defined on."""
    block = decoder_of(model).layers[layer]
    parent = getattr(block, MODULE_PARENT[module], None)
    found = getattr(parent, module, None)
    if not isinstance(found, torch.nn.Linear):
        raise ValueError(f"LaTen needs a Llama-style decoder (layers[i].{MODULE_PARENT[module]}.{module} a Linear); "
                         f"{type(model).__name__} has none")
    return found


class Readout:
    """log p(token) of residual-stream states read through the final norm and the LM head, in float32."""

    def __init__(self, model, rows: int = 0, vocab: int = 0):
        decoder, head = decoder_of(model), model.get_output_embeddings()
        norm = getattr(decoder, "norm", None)
        if norm is None or getattr(norm, "weight", None) is None:
            raise ValueError(f"LaTen reads writes through the final RMSNorm; {type(model).__name__} has none")
        self.weight = head.weight.detach().float()
        self.bias = None if getattr(head, "bias", None) is None else head.bias.detach().float()
        self.gain = norm.weight.detach().float()
        self.eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
                         or model.config.rms_norm_eps)
        self.vocab = vocab if 0 < vocab < self.weight.shape[0] else 0
        # A logits block of about 256 MB whatever the vocabulary.
        self.rows = rows or max(1, (1 << 26) // (self.vocab or self.weight.shape[0]))
        self.largest_tail_mass = 0.0
        """With `vocab`, the largest probability mass left to the first-order tail so far (for provenance)."""

    def log_probs(self, states: torch.Tensor, token: int, final_state: torch.Tensor, mode: str) -> torch.Tensor:
        """[N] log p(token) of each state in `states` [N, D]."""
        out = []
        for block in states.float().split(self.rows):
            out.append(torch.log_softmax(self._logits(block, final_state, mode), -1)[:, token])
        return torch.cat(out)

    def scores(self, residual: torch.Tensor, writes: torch.Tensor, token: int, final_state: torch.Tensor,
               mode: str) -> torch.Tensor:
        """[N] log p(token | residual + write) - log p(token | residual) for each write in `writes` [N, D].

        With the `final` normaliser the readout is linear, so the write's logits d are added to the
        residual's, and the increase is d[token] - log Σ_v p_v exp(d_v): summed as log1p of
        Σ p_v expm1(d_v), it keeps float32's relative precision on increases far smaller than the
        log-probs themselves (a difference of two log-probs near -10 would not)."""
        if mode != "final":
            return self.log_probs(residual[None] + writes, token, final_state, mode) - \
                self.log_probs(residual[None], token, final_state, mode)
        scale = self.gain * torch.rsqrt(final_state.float().pow(2).mean() + self.eps)
        base = torch.log_softmax(F.linear(residual.float() * scale, self.weight, self.bias), -1)
        probs = base.exp()
        weight, tail_mean = self.weight, None
        if self.vocab:
            # Exact over the `vocab` likeliest tokens (and the answer token), first order over the rest:
            # there exp(d) ~ 1 + d, whose sum is p_tail + (Σ_tail p_v W_U[v]) · x, so the error is about
            # p_tail · d^2 / 2 — negligible for one neuron's write, at a fraction of the full head's cost.
            head = torch.topk(probs, self.vocab).indices
            head = torch.cat([head[head != token], head.new_tensor([token])])
            tail_probs = probs.clone()
            tail_probs[head] = 0
            self.largest_tail_mass = max(self.largest_tail_mass, float(tail_probs.sum()))
            tail_mean = tail_probs @ self.weight
            weight, base, probs = self.weight[head], base[head], probs[head]
            token = len(head) - 1
        out = []
        for block in writes.float().split(self.rows):
            delta = F.linear(block * scale, weight)
            spread = (probs * torch.expm1(delta)).sum(-1)
            if tail_mean is not None:
                spread = spread + (block * scale) @ tail_mean
            small = torch.log1p(spread)
            # exp overflows past ~88; there the plain log-sum-exp is precise enough.
            shift = torch.where(delta.amax(-1) < 30, small, torch.logsumexp(base + delta, -1))
            out.append(delta[:, token] - shift)
        return torch.cat(out)

    def _logits(self, states: torch.Tensor, final_state: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "final":
            normed = states * torch.rsqrt(final_state.float().pow(2).mean() + self.eps)
        else:
            normed = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.linear(normed * self.gain, self.weight, self.bias)


@dataclass
class Capture:
    """One forward's internals at the predicting position, float32, one entry per layer."""

    layer_input: list[torch.Tensor]
    heads: list[torch.Tensor]
    attention: list[torch.Tensor]
    activation: list[torch.Tensor]
    mlp: list[torch.Tensor]
    final: torch.Tensor


@torch.no_grad()
def capture(model, input_ids, target: int) -> Capture:
    """Run the decoder on the tokens before `target` and keep what scoring needs at the last position."""
    decoder = decoder_of(model)
    n_layers = len(decoder.layers)
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(input_ids[:target]), dtype=torch.long, device=device)[None]
    kept: dict[str, dict[int, torch.Tensor]] = {"heads": {}, "attention": {}, "activation": {}, "mlp": {}, "final": {}}

    def keep(name: str, layer: int, into: str, out: str):
        def hook(module, inputs, output):
            kept[into][layer] = inputs[0][0, -1].float()
            kept[out][layer] = output[0, -1].float()
        return module_of(model, layer, name).register_forward_hook(hook)

    handles = [keep("o_proj", i, "heads", "attention") for i in range(n_layers)]
    handles += [keep("down_proj", i, "activation", "mlp") for i in range(n_layers)]
    handles.append(decoder.norm.register_forward_pre_hook(
        lambda module, args: kept["final"].__setitem__(0, args[0][0, -1].float())))
    was_training = model.training
    try:
        model.eval()
        out = decoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # hidden_states[i] is the input of layer i for i < L (only the last entry is normed).
    inputs = [h[0, -1].float() for h in out.hidden_states[:n_layers]]
    order = range(n_layers)
    return Capture(inputs, [kept["heads"][i] for i in order], [kept["attention"][i] for i in order],
                   [kept["activation"][i] for i in order], [kept["mlp"][i] for i in order], kept["final"][0])


@dataclass
class Location:
    """What locating found on one example; numpy, layers 0-based."""

    layer_scores: dict[str, np.ndarray]
    """`attention` / `mlp` -> [L] float32."""
    layers: dict[str, np.ndarray]
    """`attention` / `mlp` -> [n] int, the selected layers in depth order."""
    neurons: dict[str, np.ndarray]
    """kind -> [n, k] int, top neurons of each selected layer in rank order."""
    scores: dict[str, np.ndarray]
    """kind -> [n, width] float32, every neuron's score in the selected layers."""


def neuron_writes(model, state: Capture, layer: int, kind: str, shape: ModelShape) -> torch.Tensor:
    """[width, D] what each neuron of `kind` in `layer` writes into the residual stream at the position."""
    if kind == "mlp":
        return module_of(model, layer, "down_proj").weight.float().T * state.activation[layer][:, None]
    per_column = module_of(model, layer, "o_proj").weight.float().T * state.heads[layer][:, None]
    if kind == "o":
        return per_column
    # HF's repeat_kv: query head h reads kv head h // (heads / kv_heads).
    grouped = per_column.view(shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim, -1)
    return grouped.sum(1).reshape(shape.kv_heads * shape.head_dim, -1)


@torch.no_grad()
def locate(model, input_ids, target: int, n_layers: int, counts: dict[str, int], readout: Readout,
           readout_norm: str = "final") -> Location:
    """Score the layers, select the top `n_layers` of each sort, and the top `counts[kind]` neurons in them.

    `target` is the position of the answer token (`answer_target`); scores are read one position earlier."""
    if readout_norm not in READOUT_NORMS:
        raise ValueError(f"readout_norm must be one of {READOUT_NORMS}, got {readout_norm!r}")
    shape = ModelShape.of(model.config)
    if not 1 <= n_layers <= shape.layers:
        raise ValueError(f"cannot select {n_layers} of {shape.layers} layers")
    state = capture(model, input_ids, target)
    token = int(np.asarray(input_ids)[target])

    def score(residual: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
        return readout.scores(residual, writes, token, state.final, readout_norm)

    inputs = torch.stack(state.layer_input)
    middles = inputs + torch.stack(state.attention)
    layer_scores = {
        "attention": torch.cat([score(inputs[i], state.attention[i][None]) for i in range(len(inputs))]).cpu().numpy(),
        "mlp": torch.cat([score(middles[i], state.mlp[i][None]) for i in range(len(inputs))]).cpu().numpy(),
    }
    layers = {sort: np.sort(_top(torch.from_numpy(scores), n_layers).numpy()) for sort, scores in layer_scores.items()}
    neurons, scores = {}, {}
    for kind, k in counts.items():
        residual = middles if kind == "mlp" else inputs
        stacked = torch.stack([score(residual[layer], neuron_writes(model, state, layer, kind, shape))
                               for layer in layers[KIND_LAYERS[kind]].tolist()])
        if k > stacked.shape[1]:
            raise ValueError(f"cannot select {k} {kind} neurons of {stacked.shape[1]} per layer")
        scores[kind] = stacked.cpu().numpy()
        neurons[kind] = torch.stack([_top(row, k) for row in stacked]).cpu().numpy()
    return Location(layer_scores, layers, neurons, scores)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, highest first; ties keep the lower index (deterministic)."""
    return torch.argsort(scores, descending=True, stable=True)[:k]


def module_vectors(model, layer: int, module: str, neurons) -> torch.Tensor:
    """[k, D] the selected neurons' vectors: rows of up/v, columns of down/o (as rows)."""
    weight = module_of(model, layer, module).weight.detach()
    index = torch.as_tensor(np.asarray(neurons), dtype=torch.long, device=weight.device)
    return weight.index_select(0, index) if module in ROW_MODULES else weight.index_select(1, index).T


def check_settings(settings: LatenExtractConfig) -> None:
    """Refuse `methods.laten.teacher` values bad in combination, before any work, naming the key (each key's own
    range is checked when the config loads: `LatenExtractConfig.RANGES`)."""
    bad = sorted(set(settings.modules) - set(MODULES))
    checks = [
        (settings.modules and not bad,
         f"methods.laten.teacher.modules must be a non-empty subset of {list(MODULES)}, got {settings.modules}"),
        (settings.readout_vocab == 0 or settings.readout_norm == "final",
         "methods.laten.teacher.readout_vocab needs readout_norm: final (the `own` norm is not linear in the write)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_pair(teacher: ModelShape, student: ModelShape, counts: dict[str, int]) -> None:
    if teacher.layers < student.layers:
        raise ValueError(f"LaTen maps the top {student.layers} teacher layers onto the student's {student.layers}, "
                         f"but the teacher has only {teacher.layers}")
    for kind, k in counts.items():
        if teacher.widths[kind] < k:
            raise ValueError(f"the teacher has {teacher.widths[kind]} {kind} neurons per layer, fewer than the {k} "
                             "to transfer; lower methods.laten.teacher.transfer_rate")


def student_shape(config: PktConfig) -> ModelShape:
    """The student's shape from its config alone: stage one never loads student weights."""
    from ...models import load_model_config

    return ModelShape.of(load_model_config(config.student, config.runtime.trust_remote_code, needed_for=(
        "`pkt extract --with laten` needs the student, whose width sets how many neurons transfer: pass "
        "--student (or set `student`)")))


def _with_targets(examples: list[Example], tokenizer) -> list[tuple[Example, int]]:
    usable = [(example, answer_target(example, tokenizer)) for example in examples]
    dropped = [example.example_id for example, target in usable if target is None]
    if dropped:
        log.warning("LaTen skips %d example(s) with no answer token to locate on: %s", len(dropped), dropped[:5])
    return [(example, target) for example, target in usable if target is not None]


def _ragged(examples: list[Example]) -> dict[str, np.ndarray]:
    offsets = np.cumsum([0, *(len(e.input_ids) for e in examples)]).astype(np.int64)
    return {"tokens": np.concatenate([e.input_ids for e in examples]).astype(np.int32),
            "supervised": np.concatenate([e.supervised for e in examples]).astype(bool), "offsets": offsets}


def _store(array: torch.Tensor, dtype: str, name: str) -> np.ndarray:
    stored = array.float().cpu().numpy().astype(dtype)
    if not np.isfinite(stored).all():
        raise ValueError(f"the teacher's {name} vectors overflow {dtype}; set methods.laten.teacher.storage_dtype=float32")
    return stored


class LatenExtra(TeacherExtra):
    """The teacher side of LaTen: located layers, neurons and their rows/columns, plus the examples."""

    def inputs(self, config: PktConfig) -> dict:
        return {"laten": dataclasses.asdict(self.settings), "student": str(config.student),
                "data_dir": str(config.assets.data_dir)}

    def compute(self, teacher, tokenizer, config: PktConfig, data_path: Path, progress: bool) -> ExtraOutput:
        from tqdm.auto import tqdm

        settings, cfg = self.settings, config.extract
        check_settings(settings)
        student, teacher_shape = student_shape(config), ModelShape.of(teacher.config)
        counts = neuron_counts(student, settings.transfer_rate)
        counts = {kind: counts[kind] for kind in kinds_of(settings.modules)}
        check_pair(teacher_shape, student, counts)
        defaults = {"extract": "extract.jsonl", "align": "align.jsonl", "inject": data_path.name}  # beside the data
        paths = {role: resolve_data(getattr(settings, f"{role}_data"), config.assets.data_dir, beside=data_path,
                                    default_name=name, setting=f"methods.laten.teacher.{role}_data")
                 for role, name in defaults.items()}
        prompt = {"prompt_format": cfg.prompt_format, "max_length": cfg.max_length,
                  "train_on_inputs": cfg.train_on_inputs}
        loaded = {role: load_examples(path, tokenizer, **prompt)[0] for role, path in paths.items()}

        rng = np.random.default_rng(settings.seed)
        candidates = _with_targets(loaded["extract"], tokenizer)
        if not candidates:
            raise ValueError(f"no example of {paths['extract']} has an answer token to locate on")
        wanted = settings.locate_examples or len(candidates)
        located = [candidates[i] for i in rng.permutation(len(candidates))[:wanted]]
        pool = _with_targets(loaded["inject"], tokenizer)
        if not pool:
            raise ValueError(f"no example of {paths['inject']} has an answer token to locate on")
        located.append(pool[int(rng.integers(len(pool)))])
        align = loaded["align"]

        readout = Readout(teacher, vocab=settings.readout_vocab)
        found: list[Location] = []
        vectors: dict[str, list[torch.Tensor]] = {m: [] for m in settings.modules}
        for example, target in tqdm(located, desc="laten locate", unit="ex", disable=not progress):
            location = locate(teacher, example.input_ids, target, student.layers, counts, readout,
                              settings.readout_norm)
            found.append(location)
            for module in settings.modules:
                kind = MODULE_KIND[module]
                layers = location.layers[KIND_LAYERS[kind]].tolist()
                vectors[module].append(torch.stack([module_vectors(teacher, layer, module, location.neurons[kind][i])
                                                    for i, layer in enumerate(layers)]).cpu())

        arrays = {f"examples/{key}": value for key, value in _ragged([e for e, _ in located] + align).items()}
        arrays["examples/targets"] = np.asarray([target for _, target in located], dtype=np.int32)
        for sort in ("attention", "mlp"):
            arrays[f"layers/{sort}"] = np.stack([loc.layers[sort] for loc in found]).astype(np.int32)
            arrays[f"layer_scores/{sort}"] = np.stack([loc.layer_scores[sort] for loc in found]).astype(np.float32)
        for kind in counts:
            arrays[f"neurons/{kind}"] = np.stack([loc.neurons[kind] for loc in found]).astype(np.int32)
        for module, stacks in vectors.items():
            arrays[f"vectors/{module}"] = _store(torch.stack(stacks), settings.storage_dtype, module)
        provenance = {
            "settings": dataclasses.asdict(settings),
            "student": {"id": str(config.student), "shape": dataclasses.asdict(student)},
            "teacher_shape": dataclasses.asdict(teacher_shape),
            "counts": counts, "modules": list(settings.modules), "readout_norm": settings.readout_norm,
            "readout_tail_mass": readout.largest_tail_mass,
            "data": {role: str(path) for role, path in paths.items()}, "prompt": prompt,
            "locate": [e.example_id for e, _ in located[:-1]], "inject": located[-1][0].example_id,
            "extract_examples": len(loaded["extract"]),
            "align": [e.example_id for e in align],
        }
        return ExtraOutput(arrays, provenance)
