"""Stage two's streaming loader: whole cached sequences in length-bucketed, shuffled, resumable batches.

    with CacheLoader("cache/qwen1.5b-mmlu", batch_size=8, layers=[12, 20]) as loader:
        for batch in loader.batches(1000):     # crosses epochs as needed
            ...                                # batch.input_ids, batch.teacher[12], batch.topk_logprobs
        state = loader.state_dict()            # resume later, even with other teacher layers

The order is a plan computed from the index alone, so a position is two numbers (epoch, batches
done): resuming recomputes the plan and skips by count without reading what it skips. Arrays are
read a whole group (one zarr shard) at a time on a background thread, because one read per group
decodes a shard's chunks together where a read per example pays zarr's per-call cost each time.
An uncompressed cache on local disk is read as views of its memory-mapped shards instead
(`Cache.read_path`), so the ranks of one node share one copy of it in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

import numpy as np
import torch

from .cache import Cache, CacheError, open_cache
from .cache.codecs import decode_topk
from .cache.layout import decode, delta_key, hidden_key
from .losses import next_token_mask
from .residual import residual_delta

if TYPE_CHECKING:
    from .xtok import AlignedExample

KINDS = ("hidden", "delta")
TOPK_KEYS = ("topk/logprobs", "topk/indices")
TokenMask = Literal["supervised", "answer"]
TOKEN_MASKS: tuple[str, ...] = get_args(TokenMask)
"""Which tokens a loss sees: the cache's `supervised` mask (every token under `extract.train_on_inputs`)
or the `answer` (reply) tokens alone."""


Role = Literal["train", "locate", "align"]


@dataclass(frozen=True)
class ExampleMeta:
    """What a batch source knows of one member beyond its id, so that nothing is encoded in id strings."""

    position: int
    """The example's place in its source's own list (ids alone may repeat across a method's splits)."""
    role: Role = "train"
    """`train` for the cache loader; LaTen's `locate` (the step's located example) or `align`."""
    anchor: int | None = None
    """The position of the example this one was batched for (LaTen: the located example whose translated
    deltas the step injects), so any micro-batch of the step knows it; None where none is."""


@dataclass
class StudentTokens:
    """A batch's examples in the student's own tokenization, for a student with another tokenizer than the
    cache's teacher (`pkt_pipeline.xtok`; only methods with `Method.cross_tokenizer` get it). Right-padded."""

    input_ids: torch.Tensor                 # [B, S] int64
    attention_mask: torch.Tensor            # [B, S] int64
    supervised: torch.Tensor                # [B, S] bool
    answer: torch.Tensor                    # [B, S] bool
    pairs: tuple[torch.Tensor, ...]         # per example [P, 2] int64 (teacher token, student token), `Alignment.pairs`
    chunks: tuple[torch.Tensor, ...]        # per example [C, 4] int64, `Alignment.chunks`

    def tokens_mask(self, tokens: str) -> torch.Tensor:
        """[B, S] bool: the student's `supervised` or `answer` tokens (as `Batch.tokens_mask`)."""
        if tokens not in TOKEN_MASKS:
            raise ValueError(f"tokens must be one of {TOKEN_MASKS}, got {tokens!r}")
        return self.supervised if tokens == "supervised" else self.answer

    def scored_next(self, tokens: str) -> torch.Tensor:
        """[B, S] bool: the positions whose next token is one of the student's `tokens` (what its CE scores)."""
        return next_token_mask(self.tokens_mask(tokens), self.attention_mask)

    def pairs_where(self, teacher_mask: torch.Tensor,
                    student_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, teacher positions, student positions), [P] each, grouped by row: the aligned `pairs` whose
        teacher token is set in `teacher_mask` [B, T] and student token in `student_mask` [B, S]."""
        device = teacher_mask.device
        rows, teacher, own = [], [], []
        for row, pairs in enumerate(self.pairs):
            t, s = pairs[:, 0].to(device), pairs[:, 1].to(device)
            keep = (t < teacher_mask.shape[1]) & (s < student_mask.shape[1])
            t, s = t[keep], s[keep]
            keep = teacher_mask[row, t] & student_mask[row, s]
            rows.append(torch.full((int(keep.sum()),), row, dtype=torch.long, device=device))
            teacher.append(t[keep])
            own.append(s[keep])
        if not rows:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty, empty
        return torch.cat(rows), torch.cat(teacher), torch.cat(own)

    def to(self, device: torch.device | str) -> StudentTokens:
        return StudentTokens(self.input_ids.to(device), self.attention_mask.to(device), self.supervised.to(device),
                             self.answer.to(device), tuple(p.to(device) for p in self.pairs),
                             tuple(c.to(device) for c in self.chunks))

    def rows(self, rows: slice) -> StudentTokens:
        """The examples `rows`, cut to their own longest sequence."""
        width = int(self.attention_mask[rows].sum(1).max()) if len(self.pairs[rows]) else 0
        return StudentTokens(self.input_ids[rows, :width], self.attention_mask[rows, :width],
                             self.supervised[rows, :width], self.answer[rows, :width], self.pairs[rows],
                             self.chunks[rows])


@dataclass
class Batch:
    """Right-padded sequences and their cached teacher signals; every padded position is zero."""

    example_ids: list[str]
    input_ids: torch.Tensor                 # [B, T] int64
    attention_mask: torch.Tensor            # [B, T] int64, 1 = real token
    supervised: torch.Tensor                # [B, T] bool
    teacher: dict[int, torch.Tensor]        # layer -> [B, T, D_T] in the storage dtype
    topk_logprobs: torch.Tensor | None      # [B, T, k] float32
    topk_indices: torch.Tensor | None       # [B, T, k] int64
    answer: torch.Tensor | None = None      # [B, T] bool, the reply tokens (None: a cache from before it was stored)
    meta: tuple[ExampleMeta, ...] = ()  # one per example, or () where the source gives none
    student: StudentTokens | None = None  # the student's own tokens and their alignment; cross-tokenizer methods only
    target_logprob: torch.Tensor | None = None  # [B, T] float32, the teacher's log-prob of each next token in the text

    def __post_init__(self) -> None:
        if self.meta and len(self.meta) != len(self.example_ids):
            raise ValueError(f"a batch of {len(self.example_ids)} examples got meta for {len(self.meta)} "
                             "(one per example, or none)")

    def tokens_mask(self, tokens: str) -> torch.Tensor:
        """[B, T] bool: the `supervised` tokens (the cache's loss mask) or the `answer` (reply) tokens."""
        if tokens == "supervised":
            return self.supervised
        if tokens != "answer":
            raise ValueError(f"tokens must be one of {TOKEN_MASKS}, got {tokens!r}")
        if self.answer is None:
            raise CacheError("this cache holds no answer mask (it predates it): re-extract it, or use the "
                             "`supervised` tokens")
        return self.answer

    def to(self, device: torch.device | str) -> Batch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return Batch(self.example_ids, move(self.input_ids), move(self.attention_mask), move(self.supervised),
                     {layer: move(t) for layer, t in self.teacher.items()}, move(self.topk_logprobs),
                     move(self.topk_indices), move(self.answer), self.meta,
                     None if self.student is None else self.student.to(device), move(self.target_logprob))

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.attention_mask.sum())

    def split(self, size: int) -> list[Batch]:
        """Consecutive micro-batches of at most `size` examples, each cut to its own longest sequence."""
        if size <= 0 or size >= len(self.example_ids):
            return [self]
        parts = []
        for start in range(0, len(self.example_ids), size):
            rows = slice(start, start + size)
            width = int(self.attention_mask[rows].sum(1).max())

            def cut(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return None if tensor is None else tensor[rows, :width]

            parts.append(Batch(self.example_ids[rows], cut(self.input_ids), cut(self.attention_mask),
                               cut(self.supervised), {layer: cut(t) for layer, t in self.teacher.items()},
                               cut(self.topk_logprobs), cut(self.topk_indices), cut(self.answer),
                               self.meta[rows], None if self.student is None else self.student.rows(rows),
                               cut(self.target_logprob)))
        return parts


class BatchSource(Protocol):
    """What the trainer needs of a source of batches: the cache loader, or a method's own (LaTen's).

    A position must be exactly resumable: `load_state_dict(state_dict())` on a fresh source with the same
    settings continues with the very batches the saved one would have given next."""

    def __len__(self) -> int:
        """Batches per epoch."""
        ...

    def batches(self, steps: int) -> Iterator[Batch]:
        """Exactly `steps` batches from the current position, crossing epochs as needed."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> BatchSource:
        ...

    def __exit__(self, *exc: object) -> None:
        ...


class CacheLoader:
    """Batches of whole cached sequences in a seeded, exactly resumable order.

    Per epoch: shuffle the group order, walk the examples group by group through a buffer of
    `shuffle_buffer` examples, sort each full buffer by length and cut it into batches (similar
    lengths pad little), then shuffle those batches. A buffer that does not divide into full
    batches holds a random remainder back for the next one, so only an epoch's last batch can be
    short (and `drop_last` drops it).

    Under data parallelism every rank plans the same global batches and reads only its slice
    `batch[rank::world]` of each (an empty one where a short batch has fewer examples than ranks).
    The position stays the global one, so a state resumes exactly under any number of ranks.
    """

    def __init__(self, cache: Cache | str | os.PathLike, *, batch_size: int, layers: Sequence[int] = (),
                 kind: str = "hidden", topk: bool = True, seed: int = 0, shuffle_buffer: int = 64,
                 prefetch: int = 2, read_workers: int = 4, examples: Mapping[str, str] | None = None,
                 drop_last: bool = False, rank: int = 0, world: int = 1,
                 student: Mapping[str, AlignedExample] | None = None, target_logprob: bool = False):
        """`student`: each example's own tokenization by a student with another tokenizer, aligned with the cached
        tokens (`xtok.align_cache`); given, every batch carries it as `Batch.student`. `target_logprob`: every batch
        carries the teacher's log-prob of each next token (`Batch.target_logprob`; refused on a cache without it)."""
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.student = student
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < batch_size:
            raise ValueError(f"shuffle_buffer ({shuffle_buffer}) must hold at least one batch "
                             f"(batch_size {batch_size})")
        if prefetch < 1 or read_workers < 1:
            raise ValueError(f"prefetch and read_workers must be >= 1, got {prefetch} and {read_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) = [0, {world}), got {rank}")
        self.rank, self.world = rank, world
        self.batch_size, self.shuffle_buffer, self.seed, self.drop_last = batch_size, shuffle_buffer, seed, drop_last
        self.prefetch, self.read_workers = prefetch, read_workers
        self.layers, self.kind, self.topk = tuple(dict.fromkeys(int(layer) for layer in layers)), kind, topk
        self._sources = self._teacher_sources()
        if target_logprob:
            self.cache.require_target_logprob("loading the teacher's next-token log-probs")
        self._target_key = self.cache.manifest.cross_tokenizer.target_logprob if target_logprob else None
        if topk and not self.cache.manifest.capture.top_k:
            raise CacheError(f"the cache at {self.cache.files.url} holds no top-k log-probs; pass topk=False")
        teacher_keys = [key for keys in self._sources.values() for key in keys]
        answer = ["answer"] if self.cache.has_answer_mask else []
        target = [self._target_key] if self._target_key else []
        self._keys = list(dict.fromkeys(["tokens", "supervised", *answer, *teacher_keys, *(TOPK_KEYS if topk else ()),
                                         *target]))
        self._select(examples)
        self._fingerprint = self._plan_fingerprint()
        self._epoch, self._done = 0, 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        self._reader: _Prefetch | None = None
        if len(self) == 0:
            raise ValueError(f"{len(self._ids)} examples make no batch of {batch_size} with drop_last=True")

    def _teacher_sources(self) -> dict[int, tuple[str, ...]]:
        """The arrays each requested layer is read from: one stored array, or (h_l, h_l-1) to derive a delta."""
        kinds, cached = list(self.cache.manifest.capture.kinds), self.cache.layers
        sources: dict[int, tuple[str, ...]] = {}
        for layer in self.layers:
            self.cache.check_final_layer(layer)
            if self.kind == "hidden":
                if layer not in cached or "hidden" not in kinds:
                    raise CacheError(f"layer {layer} was not captured (hidden); cached layers: {cached}, "
                                     f"kinds: {kinds}")
                sources[layer] = (hidden_key(layer),)
            elif layer < 1:
                raise ValueError("delta is defined for layers >= 1 (layer 0 is the embedding output)")
            elif "delta" in kinds and layer in cached:
                sources[layer] = (delta_key(layer),)
            elif "hidden" in kinds and layer in cached and layer - 1 in cached:
                sources[layer] = (hidden_key(layer), hidden_key(layer - 1))
            else:
                raise CacheError(f"delta of layer {layer} needs it stored or layers {layer - 1} and {layer}; "
                                 f"cached layers: {cached}, kinds: {kinds}")
        return sources

    def _select(self, examples: Mapping[str, str] | None) -> None:
        """The examples to train on, in row order; a restriction is matched by id and content hash."""
        columns = self.cache.index.select(["example_id", "content_hash", "offset", "length", "group"]).to_pydict()
        order = np.argsort(np.asarray(columns["offset"], dtype=np.int64), kind="stable")
        if examples is not None:
            cached = dict(zip(columns["example_id"], columns["content_hash"]))
            bad = [f"{example_id!r} (expected hash {wanted}, the cache has {cached.get(example_id, 'no such example')})"
                   for example_id, wanted in examples.items() if cached.get(example_id) != wanted]
            if bad:
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                raise CacheError(f"{len(bad)} of {len(examples)} requested examples do not match the cache at "
                                 f"{self.cache.files.url}: {'; '.join(bad[:5])}{more}. Examples are matched by id and "
                                 "content hash: extract a cache from this data, or leave those examples out.")
            order = np.array([i for i in order if columns["example_id"][i] in examples], dtype=np.int64)
        if len(order) == 0:
            raise ValueError(f"no examples to load from the cache at {self.cache.files.url}")
        self._ids = [columns["example_id"][i] for i in order]
        self._hashes = [columns["content_hash"][i] for i in order]
        self._offset = np.asarray(columns["offset"], dtype=np.int64)[order]
        self._length = np.asarray(columns["length"], dtype=np.int64)[order]
        self._group = np.asarray(columns["group"], dtype=np.int64)[order]
        # Row order is group order (group g starts at row g * shard_tokens), so groups are runs.
        starts = np.flatnonzero(np.diff(self._group, prepend=-1))
        self._members = np.split(np.arange(len(order)), starts[1:])

    def _plan_fingerprint(self) -> str:
        settings = {"seed": self.seed, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                    "drop_last": self.drop_last}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for row in zip(self._ids, self._hashes, self._group.tolist(), self._length.tolist()):
            digest.update(("\t".join(map(str, row)) + "\n").encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        """Batches per epoch: every batch is full but an epoch's last."""
        full, rest = divmod(len(self._ids), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches as arrays of example positions, from the index alone."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        walk = np.concatenate([self._members[g] for g in rng.permutation(len(self._members))])
        batches: list[np.ndarray] = []
        carry, cursor = walk[:0], 0
        while cursor < len(walk):
            take = self.shuffle_buffer - len(carry)
            buffer, cursor = np.concatenate([carry, walk[cursor:cursor + take]]), cursor + take
            carry = buffer[:0]
            if cursor < len(walk) and len(buffer) % self.batch_size:
                held = np.zeros(len(buffer), dtype=bool)
                held[rng.choice(len(buffer), len(buffer) % self.batch_size, replace=False)] = True
                buffer, carry = buffer[~held], buffer[held]
            buffer = buffer[np.argsort(self._length[buffer], kind="stable")]
            cut = [buffer[i:i + self.batch_size] for i in range(0, len(buffer), self.batch_size)]
            if self.drop_last and len(cut[-1]) < self.batch_size:
                cut.pop()
            batches.extend(cut[i] for i in rng.permutation(len(cut)))
        self._plan_cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the position then points at the next epoch's start."""
        return self._pass(len(self) - self._done)

    def batches(self, steps: int) -> Iterator[Batch]:
        """Exactly `steps` batches from the current position, crossing epochs as needed."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        return self._steps(steps)

    def _steps(self, steps: int) -> Iterator[Batch]:
        while steps > 0:
            count = min(steps, len(self) - self._done)
            yield from self._pass(count)
            steps -= count

    def _pass(self, count: int) -> Iterator[Batch]:
        if self._reader is not None:
            raise RuntimeError("this loader is already being iterated; finish or close() that pass first")
        plan = self._plan(self._epoch)
        mine = [batch[self.rank::self.world] for batch in plan[self._done:self._done + count]]
        reader = _Prefetch(self._read(mine), self.prefetch)
        self._reader = reader
        try:
            for batch in reader:
                # Advanced before handing the batch over: a state saved while the consumer holds batch n says n done.
                self._done += 1
                if self._done == len(plan):
                    self._epoch, self._done = self._epoch + 1, 0
                yield batch
        finally:
            reader.close()
            if self._reader is reader:
                self._reader = None

    def _read(self, batches: list[np.ndarray]) -> Iterator[Batch]:
        """The batches in order, reading each group they touch once (on the reader thread).

        A group's examples are copied out as soon as it is read and the group dropped, so memory
        holds the examples of the current buffer window, never whole groups kept for one straggler.
        """
        wanted: dict[int, list[int]] = {}
        for batch in batches:
            for position in batch.tolist():
                wanted.setdefault(int(self._group[position]), []).append(position)
        pending: dict[int, dict[str, np.ndarray]] = {}
        for batch in batches:
            positions = batch.tolist()
            for position in positions:
                if position not in pending:
                    group = int(self._group[position])
                    self._read_group(group, wanted.pop(group), pending)
            yield (self._assemble(positions, [pending.pop(position) for position in positions]) if positions
                   else _no_examples(self._sources))

    def _read_group(self, group: int, members: list[int], into: dict[int, dict[str, np.ndarray]]) -> None:
        try:
            arrays, first = self.cache.read_group(self._keys, group, self.read_workers)
        except CacheError:  # a shard that fails its checksum: the cache names it and says how to repair it
            raise
        except Exception as error:
            raise CacheError(f"cannot read group {group} of the cache at {self.cache.files.url} "
                             f"({type(error).__name__}: {error}); its shard files: "
                             f"{', '.join(self._shard_files(group))}. "
                             f"`pkt cache verify {self.cache.files.url}` names damaged files; rerun `pkt extract` "
                             "to rewrite them.") from error
        # Views of mapped shards hold page cache, shared and reclaimable, not this process's memory:
        # only decoded groups are copied out, and the batch's assembly is then the one copy of mapped rows.
        mapped = self.cache.read_path == "mmap"
        for position in members:
            start = int(self._offset[position]) - first
            stop = start + int(self._length[position])
            into[position] = {key: array[start:stop] if mapped else array[start:stop].copy()
                              for key, array in arrays.items()}

    def _shard_files(self, group: int) -> list[str]:
        files = []
        for key in self._keys:
            try:
                array = self.cache.root[key]
                files.append(f"{key}/{array.metadata.encode_chunk_key((group,) + (0,) * (array.ndim - 1))}")
            except Exception:  # the metadata may be what is damaged: still name the array
                files.append(f"{key} (shard {group})")
        return files

    def _assemble(self, positions: list[int], rows: list[dict[str, np.ndarray]]) -> Batch:
        lengths = torch.from_numpy(self._length[positions])
        mask = torch.arange(int(lengths.max())) < lengths[:, None]
        flat = {key: np.concatenate([row[key] for row in rows]) for key in self._keys}

        def pad(values: torch.Tensor) -> torch.Tensor:
            out = values.new_zeros((len(positions), mask.shape[1], *values.shape[1:]))
            out[mask] = values
            return out

        dtype = self.cache.storage_dtype
        teacher = {}
        if self.topk:
            topk_logprobs, topk_indices = decode_topk(flat["topk/logprobs"], flat["topk/indices"], self.cache.topk_codec)
        for layer, keys in self._sources.items():
            values = decode(flat[keys[0]], dtype)
            if len(keys) == 2:  # derived delta, like Cache.delta: back in the cached dtype
                values = residual_delta(values, decode(flat[keys[1]], dtype)).to(values.dtype)
            teacher[layer] = pad(values)
        return Batch(
            example_ids=[self._ids[p] for p in positions],
            input_ids=pad(torch.from_numpy(flat["tokens"].astype(np.int64))),
            attention_mask=mask.long(),
            supervised=pad(torch.from_numpy(flat["supervised"].astype(bool))),
            teacher=teacher,
            topk_logprobs=pad(topk_logprobs) if self.topk else None,
            topk_indices=pad(topk_indices) if self.topk else None,
            answer=pad(torch.from_numpy(flat["answer"].astype(bool))) if "answer" in flat else None,
            meta=tuple(ExampleMeta(position) for position in positions),
            student=None if self.student is None else student_tokens([self.student[self._ids[p]] for p in positions]),
            target_logprob=pad(torch.from_numpy(flat[self._target_key].astype(np.float32))) if self._target_key else None,
        )

    def state_dict(self) -> dict:
        """The exact position, plus what identifies the plan it is a position in."""
        return {"epoch": self._epoch, "batches_done": self._done, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "drop_last": self.drop_last, "examples": len(self._ids),
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; teacher layers, kind and top-k may differ from the saver's."""
        missing = {"epoch", "batches_done", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"not a CacheLoader state: missing {sorted(missing)}")
        if state["fingerprint"] != self._fingerprint:
            mine = {"seed": self.seed, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                    "drop_last": self.drop_last, "examples": len(self._ids)}
            changed = [f"{key} {state[key]!r} -> {value!r}" for key, value in mine.items()
                       if key in state and state[key] != value]
            reason = ", ".join(changed) or "the cached examples differ (ids, content hashes, groups or lengths)"
            raise ValueError(f"the saved loader position belongs to another plan ({reason}); resume with the "
                             "seed, batch_size, shuffle_buffer, examples and cache it was saved with")
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if epoch < 0 or not 0 <= done <= len(self):
            raise ValueError(f"invalid loader position: epoch {epoch}, batches_done {done} of {len(self)}")
        if self._reader is not None:
            raise RuntimeError("cannot move a loader while it is being iterated; close() it first")
        self._epoch, self._done = (epoch + 1, 0) if done == len(self) else (epoch, done)

    def close(self) -> None:
        """Stop the reader thread; the position is kept, so iterating again continues from it."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> CacheLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def student_tokens(examples: Sequence[AlignedExample]) -> StudentTokens:
    """Right-pad the student's side of a batch's examples (every padded position zero)."""
    lengths = torch.tensor([len(example.input_ids) for example in examples])
    mask = torch.arange(int(lengths.max())) < lengths[:, None]

    def pad(values: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=dtype)
        out[mask] = torch.from_numpy(np.concatenate(values)).to(dtype)
        return out

    return StudentTokens(pad([e.input_ids for e in examples], torch.int64), mask.long(),
                         pad([e.supervised for e in examples], torch.bool), pad([e.answer for e in examples], torch.bool),
                         tuple(torch.from_numpy(e.alignment.pairs) for e in examples),
                         tuple(torch.from_numpy(e.alignment.chunks) for e in examples))


def _no_examples(layers: Mapping[int, object]) -> Batch:
    """A rank's empty slice of a batch with fewer examples than ranks (an epoch's short last batch)."""
    empty = torch.zeros(0, 0, dtype=torch.int64)
    return Batch([], empty, empty, empty.bool(), {layer: torch.zeros(0, 0, 0) for layer in layers}, None, None)


class _End:
    pass


@dataclass
class _Failure:
    error: BaseException


class _Prefetch:
    """Runs a producer on a daemon thread at most `depth` items ahead; its exception reaches the consumer."""

    def __init__(self, produce: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), daemon=True, name="pkt-cache-reader")
        self._thread.start()

    def _run(self, produce: Iterator) -> None:
        try:
            for item in produce:
                if not self._put(item):
                    return
            self._put(_End())
        except BaseException as error:  # everything, or the consumer would wait forever
            self._put(_Failure(error))
        finally:
            produce.close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Iterator:
        while True:
            if self._stop.is_set():
                raise RuntimeError("the loader was closed while iterating; iterate again to continue from its position")
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the cache reader thread ended without a result") from None
                continue
            if isinstance(item, _End):
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
