"""Evaluation tasks, registered by name like the methods: `pkt eval` loops over them.

A task is a `Task` subclass decorated with `@register`: it loads its items, names the id and the text
of an item (decontamination, records) and scores a list of items into one record per item (`id`,
`correct` True/False/None, and any continuous values, e.g. `nll`, `p_correct`). The stage does the
rest: decontamination against the transfer splits, the journal that makes a killed run resume, the
item records and the metrics. pkt's own tasks are below; another package adds one through the
`pkt.tasks` entry-point group (`[project.entry-points."pkt.tasks"] mine = "my_pkg.module"`):
importing the module registers it. Adding a task touches no stage.

`GenerativeTask` is the shape of GSM8K, HumanEval and MBPP: the teacher-forced NLL of the reference
reply on `eval.nll_limit` items, greedy generation (`generation.py`) ended by the task's stop rule
and a verdict on the first `eval.limit` of them. A new generative task names its prompt, reference
reply, stop rule, token budget and judge.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..plugins import load_entry_points

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..config import EvalConfig
    from .journal import Journal

TASKS: dict[str, type[Task]] = {}
"""Registered tasks by name, in registration order (pkt's own first: the order of metrics and reports)."""


class Task:
    """One benchmark or dev set. Subclasses set `name` and implement `load` and `score`."""

    name: ClassVar[str] = ""
    continuous: ClassVar[tuple[str, ...]] = ()
    """Continuous values its records carry (`nll`, `p_correct`, ...), next to the accuracy."""
    test_set: ClassVar[bool] = True
    """Its items are test items, so those found in a transfer split are dropped (`eval.decontaminate`)."""
    runs_code: ClassVar[bool] = False
    """It executes model-written code: the sandbox must be available before the model loads."""

    def load(self, data_dir: str, cfg: EvalConfig) -> list:
        """Every item, in a fixed order (the seeded subsets index into it). Data errors raise here,
        before the model loads."""
        raise NotImplementedError

    def item_id(self, item: Any) -> str:
        return item.id

    def item_text(self, item: Any) -> str:
        """The text compared with the transfer splits' user turns."""
        raise NotImplementedError

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list, cfg: EvalConfig,
              progress: bool, journal: Journal) -> list[dict]:
        """One record per scored item (`journal.score` keeps finished chunks across a kill)."""
        raise NotImplementedError


def register(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is already registered by {TASKS[cls.name].__module__}")
    TASKS[cls.name] = cls
    return cls


def available_tasks() -> tuple[str, ...]:
    _load_plugins()
    return tuple(TASKS)


def get_task(name: str) -> Task:
    _load_plugins()
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown evaluation task {name!r}; registered tasks: {', '.join(TASKS)}") from None


def _load_plugins() -> None:
    load_entry_points("pkt.tasks")


def subset(items: list, limit: int, seed: int) -> list:
    """A seeded subset of `limit` items in file order; 0 (or more than there are) means all.

    Subsets of one seed are nested (the first `limit` of one seeded permutation), so the items
    generated for accuracy are among those scored by NLL, and a larger run contains a smaller one."""
    if not limit or limit >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


def drop_contaminated(task: Task, items: list, data_dir: str) -> tuple[list, int]:
    """Drop items found in any transfer split; without the splits there is nothing to drop.

    Rows carved from a test set name their source item (`test_item_id`), which is dropped by
    construction; the overlap check catches the rest."""
    from ..datasets import transfer_split_files
    from .decontamination import contaminated_ids, declared_test_ids

    files = transfer_split_files(data_dir)
    if not files:
        return items, 0
    ids = {task.item_id(item): task.item_text(item) for item in items}
    dropped = contaminated_ids(ids, files) | (declared_test_ids(files, task.name) & set(ids))
    return [item for item in items if task.item_id(item) not in dropped], len(dropped)


@register
class Mmlu(Task):
    """0-shot, the log-likelihood of the answer letters: accuracy and `p_correct` from one forward per item."""

    name = "mmlu"
    continuous = ("p_correct",)

    def load(self, data_dir: str, cfg: EvalConfig) -> list:
        from ..datasets import find_dataset
        from .mmlu import load_mmlu

        return load_mmlu(find_dataset("mmlu", data_dir))

    def item_text(self, item: Any) -> str:
        from .mmlu import mmlu_item_text

        return mmlu_item_text(item)

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list, cfg: EvalConfig,
              progress: bool, journal: Journal) -> list[dict]:
        from .mmlu import score_mmlu

        return journal.score("score", subset(items, cfg.limit, cfg.seed), self.item_id, lambda chunk: score_mmlu(
            model, tokenizer, chunk, batch_size=cfg.batch_size, chat=cfg.chat, progress=progress,
            answer_prefix=cfg.mmlu_answer_prefix))


class GenerativeTask(Task):
    """Teacher-forced NLL of the reference reply on `nll_limit` items, greedy generation and its
    verdict on the first `limit` of them; one record per item, `correct` None where not generated."""

    continuous = ("nll",)
    generation_desc: ClassVar[str] = ""
    """The generation progress bar's label."""

    def user_turn(self, item: Any) -> str:
        raise NotImplementedError

    def reference_reply(self, item: Any) -> tuple[str, str]:
        """(text that opens the reply, unscored; the scored reference text)."""
        raise NotImplementedError

    def stop_rule(self) -> Callable[[str], int | None] | str | list[str]:
        """Where a finished answer ends (`generation.py`): a callable `text -> cut | None`, or stop strings."""
        raise NotImplementedError

    def max_new_tokens(self, cfg: EvalConfig) -> int:
        raise NotImplementedError

    def judge(self, items: list, prompts: list[str], outputs: list[str], cfg: EvalConfig,
              progress: bool) -> list[dict]:
        """One record per generated item: `id`, `prompt`, `output`, `correct` and what explains it."""
        raise NotImplementedError

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list, cfg: EvalConfig,
              progress: bool, journal: Journal) -> list[dict]:
        from .generation import render_user_turn
        from .reference_nll import reference_nll

        scored = subset(items, cfg.limit if cfg.nll_limit is None else cfg.nll_limit, cfg.seed)
        generated = {self.item_id(item) for item in subset(items, cfg.limit, cfg.seed)} if cfg.generate else set()

        def score_nll(chunk: list) -> list[dict]:
            prompts = [render_user_turn(tokenizer, self.user_turn(item), cfg.chat) for item in chunk]
            replies = [self.reference_reply(item) for item in chunk]
            nlls = reference_nll(model, tokenizer, [p + start for p, (start, _) in zip(prompts, replies)],
                                 [target for _, target in replies], cfg.batch_size, progress, f"{self.name} nll",
                                 add_special_tokens=not (cfg.chat and getattr(tokenizer, "chat_template", None)))
            return [{"id": self.item_id(item), "nll": value["nll"], "nll_tokens": value["tokens"]}
                    for item, value in zip(chunk, nlls)]

        records = {record["id"]: record for record in journal.score("nll", scored, self.item_id, score_nll)}
        to_generate = [item for item in items if self.item_id(item) in generated]
        for record in journal.score("generate", to_generate, self.item_id,
                                    lambda chunk: self.generate(model, tokenizer, chunk, cfg, progress)):
            records[record["id"]] = {**records.get(record["id"], {"id": record["id"]}), **record}
        order = {self.item_id(item): i for i, item in enumerate(items)}
        return [{"correct": None, **record} for record in sorted(records.values(), key=lambda r: order[r["id"]])]

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list, cfg: EvalConfig,
                 progress: bool) -> list[dict]:
        from .generation import generate, render_user_turn

        if not items:
            return []
        prompts = [render_user_turn(tokenizer, self.user_turn(item), cfg.chat) for item in items]
        outputs = generate(model, tokenizer, prompts, self.max_new_tokens(cfg), cfg.generation_batch_size, progress,
                           self.generation_desc, stop=self.stop_rule())
        return self.judge(items, prompts, outputs, cfg, progress)


@register
class Gsm8k(GenerativeTask):
    """0-shot greedy: exact match of the final number."""

    name = "gsm8k"
    generation_desc = "gsm8k"

    def load(self, data_dir: str, cfg: EvalConfig) -> list:
        from ..datasets import find_dataset
        from .gsm8k import load_gsm8k

        return load_gsm8k(find_dataset("gsm8k", data_dir) / "test.jsonl")

    def item_text(self, item: Any) -> str:
        return item.question

    def user_turn(self, item: Any) -> str:
        from .gsm8k import gsm8k_prompt

        return gsm8k_prompt(item.question)

    def reference_reply(self, item: Any) -> tuple[str, str]:
        from .gsm8k import reference_reply

        return "", reference_reply(item)

    def stop_rule(self) -> Callable[[str], int | None]:
        from .generation import gsm8k_stop

        return gsm8k_stop

    def max_new_tokens(self, cfg: EvalConfig) -> int:
        return cfg.max_new_tokens_gsm8k

    def judge(self, items: list, prompts: list[str], outputs: list[str], cfg: EvalConfig,
              progress: bool) -> list[dict]:
        from .gsm8k import extract_final_number, gsm8k_correct

        return [{"id": item.id, "prompt": prompt, "output": output, "extracted": extract_final_number(output),
                 "reference": item.reference, "correct": gsm8k_correct(output, item)}
                for item, prompt, output in zip(items, prompts, outputs)]


class CodeTask(GenerativeTask):
    """pass@1 with greedy decoding, the code run only in the sandbox (`sandbox.py`)."""

    runs_code = True
    generation_desc = "code"

    def item_id(self, item: Any) -> str:
        return item.task_id

    def item_text(self, item: Any) -> str:
        return item.prompt_text

    def user_turn(self, item: Any) -> str:
        from .generation import code_user_turn

        return code_user_turn(item.prompt_text)

    def reference_reply(self, item: Any) -> tuple[str, str]:
        return item.reference_reply()

    def stop_rule(self) -> Callable[[str], int | None]:
        from .generation import code_stop

        return code_stop

    def max_new_tokens(self, cfg: EvalConfig) -> int:
        return cfg.max_new_tokens_code

    def judge(self, items: list, prompts: list[str], outputs: list[str], cfg: EvalConfig,
              progress: bool) -> list[dict]:
        from .code_tasks import extract_code
        from .sandbox import run_programs

        programs = [item.test_program(extract_code(output, item.prompt_text)) for item, output in zip(items, outputs)]
        verdicts = run_programs(programs, workers=cfg.workers, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                                progress=progress, desc="execute")
        return [{"id": item.task_id, "prompt": prompt, "output": output, "verdict": verdict.status,
                 "detail": verdict.detail, "correct": verdict.passed}
                for item, prompt, output, verdict in zip(items, prompts, outputs, verdicts)]


@register
class HumanEval(CodeTask):
    name = "humaneval"

    def load(self, data_dir: str, cfg: EvalConfig) -> list:
        from ..datasets import find_dataset
        from .code_tasks import load_humaneval

        return load_humaneval(find_dataset("humaneval", data_dir))


@register
class Mbpp(CodeTask):
    """The test split, task_ids 11-510."""

    name = "mbpp"

    def load(self, data_dir: str, cfg: EvalConfig) -> list:
        from ..datasets import find_dataset
        from .code_tasks import load_mbpp

        return load_mbpp(find_dataset("mbpp", data_dir))


@register
class Dev(Task):
    """Transfer-split rows (`eval.dev_data`, `dev.py`), never test items: reply NLL, and p_correct where
    a row is MMLU's. Hyperparameters are chosen on these."""

    name = "dev"
    continuous = ("p_correct", "nll")
    test_set = False  # dev rows are transfer-split rows by definition

    def load(self, data_dir: str, cfg: EvalConfig) -> list:
        from .dev import load_dev_rows

        return load_dev_rows(cfg.dev_data, data_dir)

    def item_text(self, item: Any) -> str:
        return item.prompt

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list, cfg: EvalConfig,
              progress: bool, journal: Journal) -> list[dict]:
        from .dev import score_dev

        return journal.score("dev", subset(items, cfg.limit, cfg.seed), self.item_id, lambda chunk: score_dev(
            model, tokenizer, chunk, batch_size=cfg.batch_size, progress=progress))


__all__ = ["CodeTask", "GenerativeTask", "TASKS", "Task", "available_tasks", "drop_contaminated", "get_task",
           "register", "subset"]
