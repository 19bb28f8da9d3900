"""Supervised text tasks with true labels, GPT-1 style (Radford et al. 2018): classification,
entailment, similarity and multiple choice, built offline from the shipped Shakespeare, or read
from GLUE (`TFDS_TASKS`) where tfds has it prepared. Every example is texts and an integer label.

    tasks = shakespeare_tasks(seed=0)            # {"genre", "same_play", "speaker", "next_line"}
    tasks["genre"].test[0]                       # Example(texts=("Four lines...",), label=1)
    sst2 = tfds_task("glue/sst2", data_dir="data")

Splits hold out whole works (`TEST_WORKS`, at least one of each genre): no train example takes
text from a test work. Labels are true by construction: a passage or speech is used only if one
of its phrases is printed in no other work (`own_phrases`), so it has one source, and
distractors are checked against that source.

What the parser keeps (`speeches`): a play's speeches after its cast list (which ends at the
first "SCENE" line), each a block that opens with a speaker heading: "Hor.", "HAMLET.", "MRS.
PAGE.", "1 Citizen.", "LYSANDER" (capitals without a period), or a known heading followed by
the speech on the same line. Stage directions in brackets are cut from the lines, whole lines and
within lines alike ("[Aside.] A little more" -> "A little more"), and runs of spaces are made one.
It drops the cast list, act and scene headings, unbracketed directions ("Enter ..."), and blocks
without a heading (a speech resumed after a direction, or songs and letters set apart): a speech
is the lines under its heading, up to the next blank line. A poem's units are its stanzas
(blocks of two lines or more) after its title, or after the last rule line (Lucrece's dedication
and prose argument); numerals and titles alone on their lines are dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import itertools
import random
import re
from collections.abc import Callable
from typing import NamedTuple

import tensorflow_datasets as tfds

from zoo.data.shakespeare import works
from zoo.data.text import record_text, records

GENRE_CLASSES = ("comedy", "tragedy", "history", "poem")
# First Folio categories; Pericles (not in the Folio) with the comedies, as the late romances it sits with.
GENRES = {
    **dict.fromkeys(
        (
            "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
            "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
            "much_ado_about_nothing", "pericles", "taming_of_the_shrew", "tempest", "twelfth_night",
            "two_gentlemen_of_verona", "winters_tale",
        ),
        "comedy",
    ),
    **dict.fromkeys(
        (
            "antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear", "macbeth",
            "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida",
        ),
        "tragedy",
    ),
    **dict.fromkeys(
        (
            "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
            "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii",
        ),
        "history",
    ),
    **dict.fromkeys(
        ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"), "poem"
    ),
}  # fmt: skip
# Macbeth and The Tempest are held out of pretraining already (shakespeare.VALIDATION_PLAYS).
TEST_WORKS = ("henry_v", "macbeth", "othello", "rape_of_lucrece", "richard_ii", "tempest", "twelfth_night")
SPLITS = {
    "train": tuple(sorted(set(GENRES) - set(TEST_WORKS))),
    "test": tuple(sorted(TEST_WORKS)),
}
MIN_SPEECHES = 5  # a speaker the speaker task names has at least this many speeches in the work
# one person under headings that share no word: Richard, Duke of Gloucester, later King Richard III
SAME_PERSON = {"henry_vi_part_3": {"GLOSTER", "RICHARD"}, "richard_iii": {"GLOSTER", "KING RICHARD"}}

BRACKETED = re.compile(r"[\[{][^\[\]{}]*[\]}]")  # "[Exit Ghost.]"; "{Aside.]" as the text misprints it
# the ends of a direction left on a line: "[Exit Sergeant." and "him.]"
UNCLOSED, UNOPENED = re.compile(r"[\[{][^\n]*"), re.compile(r"^[^\]}\n]*[\]}]", re.MULTILINE)
HEADING = re.compile(r"(?:\d\.? ?)?[A-Z][A-Za-z'&. -]*")
SMALL_WORDS = {"of", "and", "&", "the", "de", "du", "le", "la"}  # the words of a heading not capitalised
NOT_SPEAKERS = re.compile(r"(ACT|SCENE|Act|Scene|[IVXL]+)\b")
DIRECTION = re.compile(r"(Enter|Re-enter|Exit|Exeunt)\b")
LETTER = re.compile("[A-Za-z]")
PHRASE_END = re.compile(r"(?<=[,.!?;:])\s+|--")
PHRASE_CUT = re.compile(f"({PHRASE_END.pattern})")  # split, keeping the cuts (to count the lines they end)


@dataclasses.dataclass(frozen=True)
class Example:
    """Texts and a label: (passage,), (premise, hypothesis), (a, b) or (context, option_0, ...)."""

    texts: tuple[str, ...]
    label: int  # a class index; for "choice", the index of the right option


@dataclasses.dataclass(frozen=True)
class LabelledTask:
    """A supervised task: its kind, class names and train and test examples."""

    name: str
    kind: str  # "classification" | "entailment" | "similarity" | "choice"
    classes: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]


class Speech(NamedTuple):
    """A speech's printed speaker (without the final period) and spoken lines; a poem's stanza has no speaker."""

    speaker: str | None
    lines: tuple[str, ...]


def squeezed_lines(block: str) -> list[str]:
    """A block's lines with letters ("* * *" is not one), stripped, runs of whitespace made one space."""
    return [" ".join(line.split()) for line in block.split("\n") if LETTER.search(line)]


def speaker_heading(line: str) -> str | None:
    """The speaker a heading line names ("Hor." -> "Hor"), or None if the line is not a heading."""
    name = line.removesuffix(".").strip()
    words = name.split()
    if not (line.endswith(".") or line.isupper()) or not HEADING.fullmatch(line) or NOT_SPEAKERS.match(line):
        return None
    if len(words) > 5 or not all(w[0].isupper() or w[0].isdigit() or w in SMALL_WORDS for w in words):
        return None
    return name


def without_directions(text: str) -> str:
    """A text with its bracketed stage directions cut, nested ones from the inside out."""
    while (cut := BRACKETED.sub("", text)) != text:
        text = cut
    return UNOPENED.sub("", UNCLOSED.sub("", text))


def play_speeches(text: str) -> tuple[Speech, ...]:
    """The speeches of a play's text (see the module's docstring for what is kept)."""
    body = without_directions(text[re.search(r"^(SCENE|Scene)\b.*$", text, re.MULTILINE).end() :])
    blocks = [squeezed_lines(block) for block in re.split(r"\n[ \t]*\n", body)]
    blocks = [block for block in blocks if block]
    headings = [speaker_heading(block[0]) if len(block) > 1 else None for block in blocks]
    by_length = sorted(set(headings) - {None}, key=len, reverse=True)
    out = []
    for (first, *rest), speaker in zip(blocks, headings):
        if speaker is None and not DIRECTION.match(first):  # "OFFICER. Good sir, be patient."
            name = next((n for n in by_length if first.startswith(n + ".") and first[len(n) + 1 :].strip()), None)
            if name is not None:
                speaker, rest = name, [first[len(name) + 1 :].strip(), *rest]
        if speaker is not None:
            out.append(Speech(speaker, tuple(rest)))
    return tuple(out)


def poem_stanzas(text: str) -> tuple[Speech, ...]:
    """The stanzas of a poem's text, after its title (or its last rule line), as speeches without a speaker."""
    rules = list(re.finditer(r"^_{5,}\s*$", text, re.MULTILINE))
    start = rules[-1] if rules else re.search(r"^by William Shakespeare\s*$", text, re.MULTILINE)
    blocks = [squeezed_lines(block) for block in re.split(r"\n[ \t]*\n", text[start.end() :])]
    return tuple(Speech(None, tuple(block)) for block in blocks if len(block) > 1)


@functools.cache
def speeches(work: str) -> tuple[Speech, ...]:
    """A work's speeches (a play) or stanzas (a poem), parsed once."""
    parse = poem_stanzas if GENRES[work] == "poem" else play_speeches
    return parse(works()[work])


class Passage(NamedTuple):
    """`lines` consecutive lines of one speech: which speech of its work, and the lines."""

    speech: int
    lines: tuple[str, ...]


def phrases(text: str) -> list[str]:
    """A text's words cut after punctuation, across lines: "What\\ndost thou mean? is it" -> ["What dost
    thou mean?", "is it"]."""
    return [phrase for phrase in PHRASE_END.split(" ".join(text.split())) if LETTER.search(phrase)]


@functools.cache
def printers() -> dict[str, str | None]:
    """The one work that prints each phrase (stage directions cut), None for a phrase printed by several:
    in a speech, in a cast list or in a block the parser drops (Love's Labour's Lost prints a sonnet of
    The Passionate Pilgrim so)."""
    found: dict[str, str | None] = {}
    for work in sorted(GENRES):
        for phrase in phrases(without_directions(works()[work])):
            found[phrase] = work if found.get(phrase, work) == work else None
    return found


@functools.cache
def own_phrases(work: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    """For each speech of a work, the first and last line of each of its phrases that no other work
    prints. A speech or run of lines that holds one whole is printed by no other work: "What dost thou
    mean?" is an Othello speech, but no own phrase, as Twelfth Night prints it too (in prose)."""
    index, out = printers(), []
    for speech in speeches(work):
        pieces, spans, line = PHRASE_CUT.split("\n".join(speech.lines)), [], 0
        for phrase, cut in itertools.zip_longest(pieces[::2], pieces[1::2], fillvalue=""):
            breaks = phrase.count("\n")
            if index.get(phrase.replace("\n", " ")) == work:
                spans.append((line, line + breaks))
            line += breaks + cut.count("\n")
        out.append(tuple(spans))
    return tuple(out)


@functools.cache
def passages(lines: int) -> dict[str, tuple[Passage, ...]]:
    """Every distinct run of `lines` consecutive lines within one speech, by work, that holds one of
    its speech's `own_phrases` whole."""
    found: dict[str, dict[tuple[str, ...], int]] = {work: {} for work in sorted(GENRES)}
    for work, runs in found.items():
        for i, (speech, spans) in enumerate(zip(speeches(work), own_phrases(work))):
            # reach[k]: the line where the soonest-ending own phrase that starts at line k or later ends
            reach = [len(speech.lines)] * (len(speech.lines) + 1)
            for first, last in spans:
                reach[first] = min(reach[first], last)
            for k in reversed(range(len(speech.lines))):
                reach[k] = min(reach[k], reach[k + 1])
            for start in range(len(speech.lines) - lines + 1):
                if reach[start] < start + lines:
                    runs.setdefault(speech.lines[start : start + lines], i)
    return {work: tuple(Passage(i, run) for run, i in runs.items()) for work, runs in found.items()}


def scaled(count: int, scale: float) -> int:
    """`count` times `scale`, rounded, at least 1."""
    return max(1, round(count * scale))


def balanced(rng: random.Random, count: int) -> list[int]:
    """`count` labels 0/1 in random order, half of each (the extra one, if odd, drawn)."""
    labels = [1, 0] * (count // 2) + [rng.randrange(2)] * (count % 2)
    rng.shuffle(labels)
    return labels


def build(
    name: str,
    kind: str,
    classes: tuple[str, ...],
    seed: int,
    per_work: Callable[[str, random.Random, tuple[str, ...]], list[Example]],
) -> LabelledTask:
    """A task from `per_work(work, rng, split_works)`: each work's examples from a generator of its own
    (seeded by task, seed and work, so one work's examples do not depend on the others'), each
    split shuffled."""
    splits = {}
    for split, names in SPLITS.items():
        examples = [e for work in names for e in per_work(work, random.Random(f"{name}/{seed}/{work}"), names)]
        random.Random(f"{name}/{seed}/{split}").shuffle(examples)
        splits[split] = tuple(examples)
    return LabelledTask(name, kind, classes, splits["train"], splits["test"])


def genre(passage_lines: int = 4, per_work: int = 60, seed: int = 0) -> LabelledTask:
    """Classification: `passage_lines` consecutive lines of one speech or stanza -> its work's genre.
    `per_work` passages from each work (all it has, if fewer), so class counts follow the number of
    works of each genre rather than being balanced."""

    def examples(work: str, rng: random.Random, _: tuple[str, ...]) -> list[Example]:
        pool = passages(passage_lines)[work]
        label = GENRE_CLASSES.index(GENRES[work])
        return [Example(("\n".join(p.lines),), label) for p in rng.sample(pool, min(per_work, len(pool)))]

    return build("genre", "classification", GENRE_CLASSES, seed, examples)


def same_play(passage_lines: int = 3, pairs_per_work: int = 60, seed: int = 0) -> LabelledTask:
    """Similarity: two passages of `passage_lines` lines, label 1 if from the same work, else 0. Each
    work leads `pairs_per_work` pairs, half with another passage of its own (from another speech, so
    the two never overlap), half with one from another work of the same split; pairs in random order."""

    def examples(work: str, rng: random.Random, names: tuple[str, ...]) -> list[Example]:
        pool, others = passages(passage_lines)[work], [n for n in names if n != work and passages(passage_lines)[n]]
        if len({p.speech for p in pool}) < 2 or not others:
            return []
        out = []
        for label in balanced(rng, pairs_per_work):
            first = second = rng.choice(pool)
            if label:
                while second.speech == first.speech:
                    second = rng.choice(pool)
            else:
                second = rng.choice(passages(passage_lines)[rng.choice(others)])
            pair = ["\n".join(first.lines), "\n".join(second.lines)]
            rng.shuffle(pair)
            out.append(Example(tuple(pair), label))
        return out

    return build("same_play", "similarity", ("different", "same"), seed, examples)


def alike(work: str, a: str, b: str) -> bool:
    """Whether two speaker names of a work may be one person: they share a word of three letters or
    more, one abbreviates the other ("KING" and "KING HENRY", "Glou" and "GLOUCESTER"), or SAME_PERSON
    says so."""
    if {a, b} <= SAME_PERSON.get(work, set()):
        return True
    words_a, words_b = ([w for w in n.upper().replace(".", " ").split() if len(w) > 2] for n in (a, b))
    return any(x.startswith(y) or y.startswith(x) for x in words_a for y in words_b)


def speaker(per_work: int = 60, seed: int = 0) -> LabelledTask:
    """Entailment: premise a speech, hypothesis "<Name> says this." with the speaker as printed (no final
    period); label 1 if that speaker says it, 0 for another speaker of the play, half of each. Only
    speakers with MIN_SPEECHES speeches or more are named and only speeches with `own_phrases` are
    used. A 0 never names one who says the speech's words anywhere, even within a longer speech,
    nor one `alike` to any who say it. Poems have no speakers."""

    def examples(work: str, rng: random.Random, _: tuple[str, ...]) -> list[Example]:
        said = [s for s in speeches(work) if s.speaker]
        counts = collections.Counter(s.speaker for s in said)
        named = sorted(n for n, c in counts.items() if c >= MIN_SPEECHES)
        words = {n: " ".join(" ".join(s.lines) for s in said if s.speaker == n) for n in named}
        sayers = collections.defaultdict(set)  # a speech with an own phrase -> who says it
        for s, spans in zip(speeches(work), own_phrases(work)):
            if s.speaker and spans:
                sayers[s.lines].add(s.speaker)
        candidates = [(lines, who) for lines, who in sayers.items() if who & set(named)]
        chosen = []  # (speech, its speaker, names for a negative), each speech once
        for lines, who in rng.sample(candidates, len(candidates)):
            if len(chosen) == per_work:
                break
            wrong = [n for n in named if " ".join(lines) not in words[n] and not any(alike(work, n, w) for w in who)]
            if wrong:
                chosen.append(("\n".join(lines), min(who & set(named)), wrong))
        return [
            Example((text, f"{who if label else rng.choice(wrong)} says this."), label)
            for (text, who, wrong), label in zip(chosen, balanced(rng, len(chosen)))
        ]

    return build("speaker", "entailment", ("no", "yes"), seed, examples)


def next_line(choices: int = 4, context_lines: int = 3, per_work: int = 60, seed: int = 0) -> LabelledTask:
    """Choice: `context_lines` consecutive lines of one speech (or stanza), then the true next line
    among `choices - 1` distinct distractor lines of the same work, at a uniformly drawn index. A
    distractor is never a line of the context nor a line that follows the same context anywhere in
    the work; contexts are `passages`, so that they name their work."""

    def examples(work: str, rng: random.Random, _: tuple[str, ...]) -> list[Example]:
        follows: dict[tuple[str, ...], list[str]] = {}  # context -> the lines after it, first one first
        for s in speeches(work):
            for start in range(len(s.lines) - context_lines):
                follows.setdefault(s.lines[start : start + context_lines], []).append(s.lines[start + context_lines])
        lines = sorted({line for s in speeches(work) for line in s.lines})
        pool = [p.lines for p in passages(context_lines)[work] if p.lines in follows]
        out = []
        for context in rng.sample(pool, min(per_work, len(pool))):
            answer, banned = follows[context][0], {*follows[context], *context}
            if len(lines) - len(banned) < choices - 1:  # banned lines are lines of the work
                continue
            options: list[str] = []
            while len(options) < choices - 1:
                line = rng.choice(lines)
                if line not in banned and line not in options:
                    options.append(line)
            label = rng.randrange(choices)
            options.insert(label, answer)
            out.append(Example(("\n".join(context), *options), label))
        return out

    return build("next_line", "choice", tuple(str(i) for i in range(choices)), seed, examples)


def shakespeare_tasks(seed: int = 0, scale: float = 1.0) -> dict[str, LabelledTask]:
    """The four Shakespeare tasks by name, per-work counts times `scale` (rounded, at least 1)."""
    count = scaled(60, scale)
    return {
        "genre": genre(per_work=count, seed=seed),
        "same_play": same_play(pairs_per_work=count, seed=seed),
        "speaker": speaker(per_work=count, seed=seed),
        "next_line": next_line(per_work=count, seed=seed),
    }


# name -> (kind, the text features in order, the split tested on)
TFDS_TASKS = {
    "glue/sst2": ("classification", ("sentence",), "validation"),
    "glue/cola": ("classification", ("sentence",), "validation"),
    "glue/rte": ("entailment", ("sentence1", "sentence2"), "validation"),
    "glue/mnli": ("entailment", ("premise", "hypothesis"), "validation_matched"),
    "glue/qnli": ("entailment", ("question", "sentence"), "validation"),
    "glue/mrpc": ("similarity", ("sentence1", "sentence2"), "validation"),
    "glue/qqp": ("similarity", ("question1", "question2"), "validation"),
}


def tfds_task(name: str, data_dir: str | None = None, limit: int | None = None) -> LabelledTask:
    """A GLUE task (a key of TFDS_TASKS) as examples, from its tfds build in `data_dir`: train from
    'train', test from 'validation' (MNLI's matched one), as GLUE's test labels are hidden; at most
    `limit` examples each. Classes are the data set's own label names (RTE: entailment first).
    Never downloads: the build must exist, as array_record, read without TensorFlow."""
    if name not in TFDS_TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TFDS_TASKS)}")
    kind, features, test_split = TFDS_TASKS[name]
    importlib.import_module("tensorflow_datasets.text.glue")  # registers "glue" (tfds imports builders lazily)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        raise ValueError(
            f"{name} is not prepared in {builder.data_dir}, and this never downloads: build it first where"
            f" there is a network, `tfds build {name} --file_format=array_record --data_dir <data_dir>`"
        )

    def examples(split: str) -> tuple[Example, ...]:
        out = []
        for record in records(builder.as_data_source(split)):
            if len(out) == limit:
                break
            if record["label"] >= 0:  # -1: unlabelled
                out.append(Example(tuple(record_text(record, f) for f in features), int(record["label"])))
        return tuple(out)

    classes = tuple(builder.info.features["label"].names)
    return LabelledTask(name, kind, classes, examples("train"), examples(test_split))
