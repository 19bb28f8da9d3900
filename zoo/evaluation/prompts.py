"""Zero-, one- and few-shot prompts: a task description, solved examples drawn from the task's
training split, then the document under evaluation, cut to what fits the model's context."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from zoo.tokenizer import TextTokenizer

SEPARATOR = "\n\n"  # between the examples and before the evaluated document


@dataclasses.dataclass(frozen=True)
class Example:
    """A task document: the text before the answer, the answer (with its leading space, as the model
    should continue), and for multiple choice the candidates (the answer among them)."""

    id: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A built prompt and how many solved examples it holds."""

    text: str
    shots: int


def draw(train: Sequence[Example], doc: Example, shots: int, seed: int) -> list[Example]:
    """`shots` training examples for `doc`, drawn from a generator seeded by the seed and the doc's
    id (so every run draws the same, and the k-shot draw starts with the (k-1)-shot one), never the
    doc itself nor an example with its question."""
    pool = [e for e in train if e.id != doc.id and e.question != doc.question]
    order = random.Random(f"{seed}/{doc.id}").sample(range(len(pool)), len(pool))
    return [pool[i] for i in order[:shots]]


def few_shot(
    tokenizer: TextTokenizer,
    doc: Example,
    train: Sequence[Example],
    shots: int,
    *,
    context_length: int,
    tail: str = "",
    reserve: int = 0,
    description: str = "",
    seed: int = 1234,
) -> Prompt | None:
    """The prompt for `doc` with up to `shots` solved examples: as many of the drawn ones as keep the
    prompt followed by `tail` (e.g. the longest candidate continuation), and `reserve` more tokens
    (e.g. those generation adds), within `context_length` tokens. None when not even the zero-shot
    prompt fits."""
    head = description + SEPARATOR if description else ""
    chosen = draw(train, doc, shots, seed)
    for used in range(len(chosen), -1, -1):
        text = head + "".join(e.question + e.answer + SEPARATOR for e in chosen[:used]) + doc.question
        if len(tokenizer.encode(text + tail)) + reserve <= context_length:
            return Prompt(text, used)
    return None
