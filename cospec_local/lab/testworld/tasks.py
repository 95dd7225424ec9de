"""Seeded task families with checkable final answers, for training and evaluating test-world models.

Every problem has a prompt, a reference step-by-step solution (training text) and a final answer; a
solution always ends with a line `ANSWER: <answer>`. `check(family, completion, answer)` reads the
LAST such line of a model's completion.

Families:
- "add": column addition of two n-digit numbers (n = 2..5), one line per column from the right:
  `digit_a+digit_b+carry_in=column_sum` with the column sum written on two digits, e.g.
      Q: 4571+3689=?
      1+9+0=10
      7+8+1=16
      5+6+1=12
      4+3+1=08
      ANSWER: 8260
- "count": count one letter in a string over "abcde" (length 5..20), with a running tally:
      Q: count b in cabbd=?
      c0 a0 b1 b2 d2
      ANSWER: 2

Problem i of a split has seed `SPLIT_SEED_BASE[split] + i`; train and eval seeds never overlap.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("add", "count")
SPLIT_SEED_BASE = {"train": 0, "eval": 1_000_000_000}
SPLIT_SIZE = 1_000_000_000  # seeds of split s lie in [SPLIT_SEED_BASE[s], SPLIT_SEED_BASE[s] + SPLIT_SIZE)
ANSWER_PATTERN = re.compile(r"ANSWER:[ \t]*([^\n]*)")
COUNT_ALPHABET = "abcde"
# A completion ends at its 'ANSWER: ...' line: nothing after it counts, so decoding stops before the
# next question the model would write.
TASK_STOP = ("\nQ:",)


@dataclass(frozen=True)
class Problem:
    """One task instance. `solution` is the reference completion (empty when unknown)."""

    family: str
    prompt: str
    answer: str
    solution: str = ""
    seed: int | None = None


def make_add_problem(seed: int, thin_sums: tuple[int, ...] = (), thin_keep: float = 1.0) -> Problem:
    """Column-addition problem for `seed`, digits drawn uniformly (the evaluation distribution).

    `thin_sums` / `thin_keep` make training data thin on some addition facts: a column whose sum
    (digit_a + digit_b + carry_in) is in `thin_sums` is kept only with probability `thin_keep`,
    otherwise its digits are drawn again.
    """
    rng = random.Random(f"add:{seed}" if not thin_sums else f"add:{seed}:{thin_sums}:{thin_keep}")
    n_digits = rng.randint(2, 5)
    digits_a, digits_b = [], []  # least significant first
    carry = 0
    for column in range(n_digits):
        lowest = 1 if column == n_digits - 1 else 0  # no leading zeros
        while True:
            da, db = rng.randint(lowest, 9), rng.randint(lowest, 9)
            if da + db + carry not in thin_sums or rng.random() < thin_keep:
                break
        digits_a.append(da)
        digits_b.append(db)
        carry = (da + db + carry) // 10
    a = int("".join(map(str, reversed(digits_a))))
    b = int("".join(map(str, reversed(digits_b))))
    lines, carry = [], 0
    for da, db in zip(digits_a, digits_b):
        column_sum = da + db + carry
        lines.append(f"{da}+{db}+{carry}={column_sum:02d}")
        carry = column_sum // 10
    answer = str(a + b)
    solution = "\n".join(lines) + f"\nANSWER: {answer}\n"
    return Problem("add", f"Q: {a}+{b}=?\n", answer, solution, seed)


def make_count_problem(seed: int, max_length: int = 20) -> Problem:
    """Letter-counting problem for `seed`, solved with a running tally.

    The string has 5..20 letters (the evaluation distribution); a smaller `max_length` gives a model
    training data without long strings.
    """
    rng = random.Random(f"count:{seed}" if max_length == 20 else f"count:{seed}:{max_length}")
    letter = rng.choice(COUNT_ALPHABET)
    text = "".join(rng.choice(COUNT_ALPHABET) for _ in range(rng.randint(5, max_length)))
    tally, steps = 0, []
    for ch in text:
        tally += ch == letter
        steps.append(f"{ch}{tally}")
    answer = str(tally)
    solution = " ".join(steps) + f"\nANSWER: {answer}\n"
    return Problem("count", f"Q: count {letter} in {text}=?\n", answer, solution, seed)


def make_problem(family: str, seed: int) -> Problem:
    """Problem of `family` for `seed`, from the standard (evaluation) distribution."""
    if family == "add":
        return make_add_problem(seed)
    if family == "count":
        return make_count_problem(seed)
    raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")


def problems(family: str, split: str, n: int, start: int = 0) -> list[Problem]:
    """Problems `start .. start+n-1` of `split` ("train" or "eval") for `family`."""
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_SEED_BASE)}")
    if start < 0 or start + n > SPLIT_SIZE:
        raise ValueError("problem indices outside the split's seed range")
    base = SPLIT_SEED_BASE[split]
    return [make_problem(family, base + i) for i in range(start, start + n)]


def extract_answer(completion: str) -> str | None:
    """Text after the last `ANSWER:` in `completion` (stripped), or None when there is none."""
    matches = ANSWER_PATTERN.findall(completion)
    return matches[-1].strip() if matches else None


def check(family: str, completion: str, answer: str) -> bool:
    """True when the completion's final `ANSWER:` line gives `answer`.

    For "add" and "count" the answer must be a plain integer equal to `answer`; for any other family
    (e.g. JSONL task files) the stripped strings must be equal.
    """
    given = extract_answer(completion)
    if given is None:
        return False
    if family in FAMILIES:
        return re.fullmatch(r"-?\d+", given) is not None and int(given) == int(answer)
    return given == answer.strip()


def load_jsonl_tasks(path: str | Path, family: str = "jsonl") -> list[Problem]:
    """Read `{"prompt": ..., "answer": ...}` lines (optional "family", "solution") into Problems.

    Blank lines are skipped; a line without "prompt" or "answer" raises ValueError with its number.
    """
    tasks = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" not in record or "answer" not in record:
                raise ValueError(f"{path}:{line_number}: needs both 'prompt' and 'answer'")
            tasks.append(Problem(family=record.get("family", family), prompt=record["prompt"],
                                 answer=str(record["answer"]), solution=record.get("solution", "")))
    return tasks
