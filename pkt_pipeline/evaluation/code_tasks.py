"""HumanEval and MBPP problems, and the programs that check a model's answer to them.

A `CodeProblem` carries what the model sees (`prompt_text`) and builds the program that
`sandbox.run_program` executes for one completion; pass@1 is the share of problems whose single
greedy completion passes. Answers go through `extract_code` first.

- HumanEval: the model continues `prompt` (imports, helpers, the signature and its docstring).
  Program = prompt + completion + test + `check(entry_point)`, as in the reference harness. When
  the completion instead restates the whole function (`def entry_point(` at column 0, as chat
  models do), it is used as is: only the part of the prompt before the entry point's `def`
  (imports and helper functions the model was shown and may call) is put in front of it.
- MBPP (test split: task_ids 11-510): the model writes the whole function. The prompt is the
  common zero-shot one (as in bigcode-evaluation-harness, see `mbpp_prompt`): a docstring holding
  the task text and the first test assert, which shows the function's name and signature.
  Program = completion + test_setup_code + the asserts of test_list (challenge_test_list unused).
  The setup goes after the solution because in the two problems that have one (367, 927)
  it builds objects of a class that the solution defines.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..jsonl import jsonl_records

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class CodeProblem:
    """One problem: what the model is shown, and how its completion is checked."""

    task_id: str  # "HumanEval/0", "MBPP/11"
    prompt_text: str
    entry_point: str
    test_code: str  # run after the solution; raises on a wrong answer
    setup_code: str = ""  # run between the solution and the tests
    continues_prompt: bool = False  # HumanEval: the completion is the body that follows the prompt
    reference_solution: str = ""  # the canonical solution (HumanEval: the body after the prompt)

    def reference_reply(self) -> tuple[str, str]:
        """(unscored start, scored rest) of a reference reply to `code_user_turn`: a ```python block
        holding the canonical solution. HumanEval's block restates the prompt first, which is
        context, not knowledge, so only the body is scored."""
        opening = "```python\n" + (self.prompt_text if self.continues_prompt else "")
        return opening, self.reference_solution.rstrip() + "\n```"

    def test_program(self, completion: str) -> str:
        """The complete program whose clean exit means `completion` solves the problem."""
        completion = completion.replace("\r\n", "\n")
        if not self.continues_prompt:
            solution = completion
        elif defines_function(completion, self.entry_point):
            solution = self.prompt_text[: _def_match(self.prompt_text, self.entry_point).start()] + completion
        else:
            solution = self.prompt_text + completion
        return "\n".join(part for part in (solution, self.setup_code, self.test_code) if part) + "\n"


def _def_match(code: str, name: str) -> re.Match | None:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.MULTILINE)


def defines_function(code: str, name: str) -> bool:
    """Whether `code` defines `name` at top level (a whole function rather than a body)."""
    return _def_match(code, name) is not None


def extract_code(generation: str, prompt: str | None = None) -> str:
    """The code in a model's answer: the first ```python (or bare ```) fenced block when there is
    one, an unclosed fence running to the end, else the raw text. When the raw text starts by
    echoing `prompt` verbatim, the echo is removed so the rest continues the prompt."""
    fenced = _FENCE.search(generation)
    if fenced:
        return fenced.group(1)
    if prompt and generation.startswith(prompt):
        return generation[len(prompt) :]
    return generation


def _read_jsonl(path: Path, what: str, keys: tuple[str, ...]) -> list[dict]:
    """The rows of a benchmark file, each checked for the `keys` the loader reads (a clear error naming
    the line, not a KeyError deep in the loader)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} data file not found: {path} (see shared/data/SOURCES.md for where it comes from)")
    rows = []
    for line, row in jsonl_records(path):
        absent = [key for key in keys if key not in row]
        if absent:
            raise ValueError(f"{path}:{line}: this {what} row lacks {', '.join(absent)} (every row needs {', '.join(keys)})")
        rows.append(row)
    return rows


HUMANEVAL_KEYS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")


def load_humaneval(path: str | Path) -> list[CodeProblem]:
    """All HumanEval problems from `HumanEval.jsonl(.gz)`, in file order."""
    problems = []
    for row in _read_jsonl(Path(path), "HumanEval", HUMANEVAL_KEYS):
        if _def_match(row["prompt"], row["entry_point"]) is None:
            raise ValueError(f"{row['task_id']}: prompt does not define its entry point {row['entry_point']!r}")
        problems.append(CodeProblem(
            task_id=row["task_id"],
            prompt_text=row["prompt"],
            entry_point=row["entry_point"],
            test_code=f"{row['test']}\n\ncheck({row['entry_point']})",
            continues_prompt=True,
            reference_solution=row["canonical_solution"],
        ))
    return problems


def mbpp_prompt(text: str, first_test: str) -> str:
    """The zero-shot MBPP prompt: task text and one assert showing the signature, as a docstring."""
    return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def _mbpp_entry_point(code: str, first_test: str, task_id: int) -> str:
    """The function the asserts call: the reference solution's top-level def named in the first assert."""
    with warnings.catch_warnings():  # old solutions have invalid escapes such as "\w" in plain strings
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(code)
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    called = set(re.findall(r"([A-Za-z_]\w*)\s*\(", first_test))
    for name in names:
        if name in called:
            return name
    if names:
        return names[0]
    raise ValueError(f"MBPP task {task_id}: reference code defines no function")


MBPP_KEYS = ("task_id", "text", "code", "test_list", "test_setup_code")


def load_mbpp(path: str | Path, task_ids: Iterable[int] = range(11, 511)) -> list[CodeProblem]:
    """MBPP problems with the given task_ids (default: the standard test split 11-510), in id order."""
    wanted = set(task_ids)
    rows = {row["task_id"]: row for row in _read_jsonl(Path(path), "MBPP", MBPP_KEYS) if row["task_id"] in wanted}
    missing = sorted(wanted - rows.keys())
    if missing:
        raise ValueError(f"MBPP task_ids not in {path}: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    problems = []
    for task_id in sorted(rows):
        row = rows[task_id]
        code = row["code"].replace("\r\n", "\n")
        problems.append(CodeProblem(
            task_id=f"MBPP/{task_id}",
            prompt_text=mbpp_prompt(row["text"], row["test_list"][0]),
            entry_point=_mbpp_entry_point(code, row["test_list"][0], task_id),
            test_code="\n".join(row["test_list"]),
            setup_code=row["test_setup_code"].replace("\r\n", "\n"),
            reference_solution=code,
        ))
    return problems
