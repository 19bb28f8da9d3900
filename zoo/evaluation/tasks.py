"""Tasks whose labels are facts, on data that exists offline: a LAMBADA-style cloze and a next-line
multiple choice on Shakespeare's held-out plays, GPT-3's synthetic arithmetic and word
unscrambling, chain-of-thought arithmetic word problems, and a cloze over any tfds text dataset.

    task = arithmetic("+", digits=2)
    scores = evaluate(model, params, tokenizer, task, shots=4)  # {"acc": ..., "shots": ..., ...}
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from zoo.data.text import tfds_documents
from zoo.evaluation import harness
from zoo.evaluation.prompts import Example, few_shot
from zoo.models.gpt import GPT
from zoo.tokenizer import TextTokenizer

ANSWER = r"The answer is (-?\d+)"  # a worked solution's last sentence


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: how it is scored, its training split (for the shots) and its test split.

    kind: "cloze" (accuracy: every answer token is the greedy choice, as LAMBADA is scored),
    "choice" (acc and acc_norm over the candidates) or "generate" (greedy generation cut at
    `until`, the answer extracted by `pattern`'s first group, or the stripped text, exact match).
    """

    name: str
    kind: Literal["cloze", "choice", "generate"]
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    description: str = ""
    until: tuple[str, ...] = ("\n",)
    pattern: str | None = None
    max_new_tokens: int = 8

    def extract(self, text: str) -> str | None:
        """The answer in a generated (or a reference) text."""
        return harness.extract_number(text, self.pattern) if self.pattern else text.strip()


def evaluate(
    model: GPT,
    params: Any,
    tokenizer: TextTokenizer,
    task: Task,
    shots: int,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 1234,
) -> dict[str, Any]:
    """The task's scores on (the first `limit` of) its test split with `shots`-shot prompts, the
    mean number of examples that fit, and how many documents did not fit even zero-shot (skipped)."""
    generating = task.kind == "generate"
    docs, prompts = [], []
    for doc in task.test[:limit]:
        prompt = few_shot(
            tokenizer,
            doc,
            task.train,
            shots,
            context_length=model.cfg.context_length,
            tail="" if generating else max([doc.answer, *doc.choices], key=len),  # what is scored after it
            reserve=task.max_new_tokens if generating else 0,
            description=task.description,
            seed=seed,
        )
        if prompt is not None:
            docs.append(doc)
            prompts.append(prompt)
    result = {"task": task.name, "shots": shots, "documents": len(docs), "skipped": len(task.test[:limit]) - len(docs)}
    if not docs:
        return result
    texts = [p.text for p in prompts]
    if task.kind == "cloze":
        scores = harness.loglikelihood(
            model, params, tokenizer, list(zip(texts, [d.answer for d in docs])), batch_size=batch_size
        )
        result["acc"] = float(np.mean([greedy for _, greedy in scores]))
    elif task.kind == "choice":
        questions = [harness.MultipleChoice(t, d.choices, d.choices.index(d.answer)) for t, d in zip(texts, docs)]
        result.update(harness.multiple_choice(model, params, tokenizer, questions, batch_size=batch_size))
    else:
        outputs = harness.generate_until(
            model, params, tokenizer, texts, task.until, task.max_new_tokens, batch_size=batch_size
        )
        result["acc"] = float(np.mean([task.extract(o) == task.extract(d.answer) for o, d in zip(outputs, docs)]))
    result["fit"] = float(np.mean([p.shots for p in prompts]))
    return result


def speeches(play: str) -> list[tuple[str, list[str]]]:
    """(speaker line, spoken lines) of each speech in a play's text (blocks after a "NAME." line)."""
    out = []
    for block in play.split("\n\n"):
        lines = [line for line in block.strip().split("\n") if line]
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z .'-]*\.", lines[0]):
            out.append((lines[0], lines[1:]))
    return out


def shakespeare_cloze(plays: dict[str, str], *, min_words: int = 12, max_words: int = 60) -> tuple[Example, ...]:
    """Speeches whose last word (letters only) is to be predicted from the rest of the speech, as in
    LAMBADA; speeches of `min_words` to `max_words` words."""
    out = []
    for name, play in sorted(plays.items()):
        for i, (speaker, lines) in enumerate(speeches(play)):
            text = "\n".join(lines)
            found = re.search(r"\s([A-Za-z]+)\W*$", text)
            if found and min_words <= len(text.split()) <= max_words:
                out.append(Example(f"{name}/{i}", f"{speaker}\n{text[: found.start()]}", " " + found.group(1)))
    return tuple(out)


def shakespeare_next_line(plays: dict[str, str], *, lines_before: int = 3, seed: int = 0) -> tuple[Example, ...]:
    """The true next line of a speech against three lines from elsewhere in the same play, after the
    speech's first `lines_before` lines."""
    out = []
    for name, play in sorted(plays.items()):
        rng = random.Random(f"{seed}/{name}")
        said = speeches(play)
        everything = sorted({line for _, lines in said for line in lines})
        for i, (speaker, lines) in enumerate(said):
            if len(lines) <= lines_before:
                continue
            answer = lines[lines_before]
            others = rng.sample([line for line in everything if line != answer], 3)
            choices = tuple(rng.sample([answer, *others], 4))
            out.append(Example(f"{name}/{i}", "\n".join([speaker, *lines[:lines_before]]) + "\n", answer, choices))
    return tuple(out)


def arithmetic(operation: Literal["+", "-"], digits: int, *, count: int = 500, seed: int = 0) -> Task:
    """GPT-3's arithmetic: "Q: What is 48 plus 76?\\nA: 124", numbers of `digits` digits, answered by
    greedy generation; the training split (for the shots) and test split never share a question."""
    word = {"+": "plus", "-": "minus"}[operation]
    rng = random.Random(f"{seed}/{operation}/{digits}")
    low, high = 10 ** (digits - 1), 10**digits - 1
    questions = {}
    while len(questions) < 2 * count:
        a, b = rng.randint(low, high), rng.randint(low, high)
        questions[f"Q: What is {a} {word} {b}?\nA:"] = str(a + b if operation == "+" else a - b)
    examples = [Example(f"{i}", q, " " + a) for i, (q, a) in enumerate(questions.items())]
    return Task(f"arithmetic {digits}-digit {operation}", "generate", tuple(examples[count:]), tuple(examples[:count]))


def unscramble(words: Iterable[str], *, count: int = 500, seed: int = 0) -> Task:
    """GPT-3's anagram task (A1): a word with all but its first and last letters shuffled, to be
    written back; words of 5 or more letters whose shuffle differs from them."""
    rng = random.Random(f"{seed}/unscramble")
    pool = sorted({w.lower() for w in words if len(w) >= 5 and w.isalpha() and w.isascii()})
    examples = []
    for i, word in enumerate(rng.sample(pool, min(2 * count, len(pool)))):
        middle = list(word[1:-1])
        while "".join(middle) == word[1:-1] and len(set(middle)) > 1:
            rng.shuffle(middle)
        examples.append(Example(str(i), f"{word[0]}{''.join(middle)}{word[-1]} =", " " + word))
    description = "Unscramble the letters into a word."
    half = len(examples) // 2
    return Task("unscramble", "generate", tuple(examples[half:]), tuple(examples[:half]), description)


NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana")
THINGS = ("apples", "books", "coins", "shells", "stamps", "marbles")


def word_problem(rng: random.Random, steps: int) -> tuple[str, str, int]:
    """(question, worked solution ending "The answer is N.", N): someone's count of things changed
    by `steps` additions, subtractions or doublings, never below zero."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(2, 20)
    story, work = [f"{name} has {total} {thing}."], []
    for _ in range(steps):
        kind = rng.choice(["gets", "gives", "doubles"] if total <= 50 else ["gets", "gives"])
        if kind == "gets":
            n = rng.randint(1, 20)
            story.append(f"{name} gets {n} more.")
            work.append(f"{total} + {n} = {total + n}.")
            total += n
        elif kind == "gives" and total > 1:
            n = rng.randint(1, total - 1)
            story.append(f"{name} gives away {n}.")
            work.append(f"{total} - {n} = {total - n}.")
            total -= n
        else:
            story.append(f"{name} doubles them.")
            work.append(f"{total} * 2 = {2 * total}.")
            total *= 2
    question = " ".join(story) + f" How many {thing} does {name} have?"
    return question, " ".join(work) + f" The answer is {total}.", total


def chain_of_thought(*, count: int = 200, steps: Sequence[int] = (2, 3), seed: int = 0) -> Task:
    """Multi-step word problems with worked solutions (the steps, then "The answer is N."), scored by
    the final number the generated solution states."""
    rng = random.Random(f"{seed}/chain-of-thought")
    examples = []
    for i in range(2 * count):
        question, solution, _ = word_problem(rng, rng.choice(list(steps)))
        examples.append(Example(str(i), f"Q: {question}\nA:", " " + solution))
    return Task(
        "chain-of-thought arithmetic",
        "generate",
        tuple(examples[count:]),
        tuple(examples[:count]),
        pattern=ANSWER,
        max_new_tokens=64,
    )


def shakespeare_tasks(train_plays: dict[str, str], test_plays: dict[str, str]) -> list[Task]:
    """The cloze and the next-line choice, shots from the training plays, documents from the held-out ones."""
    return [
        Task("shakespeare cloze", "cloze", shakespeare_cloze(train_plays), shakespeare_cloze(test_plays)),
        Task("shakespeare next line", "choice", shakespeare_next_line(train_plays), shakespeare_next_line(test_plays)),
    ]


def tfds_cloze(
    name: str, *, split: str = "test", train_split: str = "train", feature: str = "text", data_dir: str | None = None
) -> Task:
    """The last-word cloze over any tfds text dataset, e.g. `tfds_cloze("lambada", feature="passage")`
    (its train split is LAMBADA's development set), on machines that can download it or hold its
    build in `data_dir`: each text's last word is the answer."""

    def examples(which: str) -> tuple[Example, ...]:
        out = []
        for i, text in enumerate(tfds_documents(name, which, data_dir, feature)):
            head, _, last = text.strip().rpartition(" ")
            if head and last:
                out.append(Example(f"{which}/{i}", head, " " + last))
        return tuple(out)

    return Task(f"{name} cloze", "cloze", examples(train_split), examples(split))
