"""Instructions whose compliance is a fact computed by code, for an InstructGPT-style pipeline
(SFT -> reward model -> PPO) at tiny scale: a reward model's pairwise accuracy and a policy's
improvement are measured against `score`, the truth, never against another model.

    train = instructions(1000, seed=0)          # kinds in turn: words, include, sum, question
    train[0]                                    # Instruction("words", "Answer in 4 words or fewer.", target=4)
    demonstration(train[0], seed=0)             # "Wallets of flesh?": a response that complies
    score(train[0], "To be, or not to be")      # 0.5: six words, two too many of four
    score(train[2], "51")                       # 1.0: train[2] is "What is 14 + 37?"
    test = instructions(200, seed=0, split="test")

Four kinds, each scored in [0, 1] and graded where the rule allows:

- "words": "Reply in at most N words." (N in 2..8). A word is a whitespace-separated token with a
  letter or digit in it. 0 for no words, 1 for 1..N words, else max(0, 1 - (words - N) / N).
- "include": "Include the word 'W'." (W from ~40 common words of the works). 1 if W is one of the
  response's words, else 0: case-insensitive, where a word is a run of letters and digits, inner
  apostrophes kept ("My Love!" and "true-love" include 'love'; "lovely" and "love's" do not).
- "sum": "a + b =" (a, b in 0..49). The first integer x in the response (-?\\d+): 1 if x == a + b,
  else max(0, 1 - |x - (a + b)| / 10); 0 if there is none.
- "question": "End with a question." 1 if the response, stripped, ends with "?" and has a word.

Splits hold out instructions by construction, so no test instruction's text is a train
instruction's text (for any seed): "words" holds out the (phrasing, N) pairs with
(phrasing index + N) % 4 == 0, so every phrasing and every N is seen in train, but not together;
"include" holds out a fixed quarter of the words (`_INCLUDE_TEST`); "sum" holds out the pairs with
(a + b) % 5 == 0; "question" has no target, so two of its phrasings are held out.

Demonstrations are sentences of the shipped works (any work, the validation plays included: they
are answers, not evaluation data) of 2-12 words (one word alone is too often a name) and at most
80 characters: a whole line of verse or prose, or a sentence within one, opening with a capital and
closing with ".", "!" or "?", taken from the speeches (cast lists, act and scene headings, speaker
headings, stage directions and words in capitals are dropped). "words" draws uniformly from the
sentences of 2..N words, "include" from those with the word, "question" from those ending with
"?". For "sum" the demonstration is the answer, str(a + b). A pool of ~41,000 sentences is built
once, on first use, in about a second.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import random
import re
from collections.abc import Sequence

from zoo.data.shakespeare import works

KINDS = ("words", "include", "sum", "question")
_SPLITS = ("train", "test")

_WORDS_PHRASINGS = (
    "Reply in at most {n} words.",
    "Answer in {n} words or fewer.",
    "Use no more than {n} words.",
    "Say it in {n} words or less.",
    "At most {n} words, please.",
)
_WORDS_RANGE = range(2, 9)
_INCLUDE_PHRASINGS = (
    "Include the word '{w}'.",
    "Use the word '{w}'.",
    "Say something with '{w}' in it.",
    "Put '{w}' in your reply.",
)
# Common words of the works, each in hundreds of short sentences; a quarter held out for test.
_INCLUDE_TRAIN = (
    "love", "night", "king", "heart", "death", "lord", "sweet", "good", "man", "god",
    "life", "day", "time", "eyes", "world", "blood", "father", "fair", "honour", "soul",
    "hand", "mother", "son", "sir", "friend", "peace", "gold", "sleep", "true", "fool",
)  # fmt: skip
_INCLUDE_TEST = ("heaven", "queen", "fear", "war", "crown", "grace", "old", "light", "gentle", "noble")
_SUM_PHRASINGS = (
    "{a} + {b} =",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What do {a} and {b} make?",
)
_SUM_RANGE = range(50)
_QUESTION_TRAIN = ("End with a question.", "Reply with a question.", "Ask me something.", "Answer me with a question.")
_QUESTION_TEST = ("Respond with a question.", "Ask a question.")

_MAX_WORDS = 12  # a demonstration's words and characters at most: short for a 128-token context
_MAX_CHARS = 80
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # "include": letters and digits, inner apostrophes kept
_TOKEN = re.compile(r"\S*[^\W_]\S*")  # "words": a whitespace-separated token with a letter or digit
_INTEGER = re.compile(r"-?\d+")
# Sentence ends within a line (spaces made one), not after the abbreviations of titles ("Mrs. Page").
_SENTENCE_END = re.compile(r"(?<=[.!?]) (?<![MD]r\. )(?<!Mrs\. )(?<!St\. )")
_START = re.compile(r"(?im)^(?:act|scene|prologue|induction)\b")  # the first ends a play's cast list
_HEADING = re.compile(r"(?:[A-Z0-9][^\s,]* ){0,3}[A-Z0-9][^\s,]*\.")  # a speaker: "Ber.", "1 Citizen.", "MRS. PAGE."
_SKIP = (  # how headings of acts and scenes, and stage directions without brackets, open
    *("ACT ", "Act ", "SCENE", "Scene ", "PROLOGUE", "Prologue", "INDUCTION", "Induction", "EPILOGUE", "Epilogue"),
    *("Enter ", "Re-enter ", "Exit", "Exeunt", "Manet ", "Flourish"),
)
# A sentence opens with a capital, or a quotation mark and a capital, or an elision ("'Tis").
_QUOTED = re.compile(r""""[A-Z]|'(?:Tis|Twas|Twere|Twill|Twould|Twixt|Tween|Gainst|Mongst|Sblood|Zounds|Swounds)\b""")
_CAPITALS = re.compile(r"\b[A-Z]{2,}")  # a word in capitals is a heading's: "PHILARIO'S house."


@dataclasses.dataclass(frozen=True)
class Instruction:
    """A user's message and what its rule needs: words: N (max words); include: the word (lowercase);
    sum: a + b (the answer); question: ""."""

    kind: str
    text: str
    target: int | str

    def __post_init__(self) -> None:
        _check("kind", self.kind, KINDS)


def _check(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}")


def _count_words(text: str) -> int:
    """Whitespace-separated tokens with a letter or digit in them ("--" is not a word)."""
    return len(_TOKEN.findall(text))


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def score(instruction: Instruction, response: str) -> float:
    """The true compliance of `response` in [0, 1] (1: fully compliant), graded where the rule allows."""
    kind, target = instruction.kind, instruction.target
    if kind == "words":
        count = _count_words(response)
        if count == 0:
            return 0.0
        return 1.0 if count <= target else max(0.0, 1.0 - (count - target) / target)
    if kind == "include":
        return float(target in _words(response))
    if kind == "sum":
        match = _INTEGER.search(response)
        return 0.0 if match is None else max(0.0, 1.0 - abs(int(match.group()) - target) / 10)
    return float(response.strip().endswith("?") and _count_words(response) > 0)  # question


def _held_out(kind: str, phrasing: int, target: int | str) -> bool:
    """Whether an instruction belongs to the test split (see the module docstring)."""
    if kind == "words":
        return (phrasing + target) % 4 == 0
    if kind == "include":
        return target in _INCLUDE_TEST
    if kind == "sum":
        return target % 5 == 0
    return phrasing >= len(_QUESTION_TRAIN)


@functools.cache
def _space(kind: str, split: str) -> tuple[Instruction, ...]:
    """Every instruction of a kind in a split, each (phrasing, target) once; sums once per pair (a, b)."""
    if kind == "words":
        options = [(i, p.format(n=n), n) for i, p in enumerate(_WORDS_PHRASINGS) for n in _WORDS_RANGE]
    elif kind == "include":
        words = _INCLUDE_TEST if split == "test" else _INCLUDE_TRAIN
        options = [(i, p.format(w=w), w) for i, p in enumerate(_INCLUDE_PHRASINGS) for w in words]
    elif kind == "sum":
        options = [
            (i, p.format(a=a, b=b), a + b) for i, p in enumerate(_SUM_PHRASINGS) for a in _SUM_RANGE for b in _SUM_RANGE
        ]
    else:
        options = [(i, p, "") for i, p in enumerate(_QUESTION_TRAIN + _QUESTION_TEST)]
    return tuple(
        Instruction(kind, text, target)
        for i, text, target in options
        if _held_out(kind, i, target) == (split == "test")
    )


def instructions(count: int, seed: int, split: str = "train", kinds: Sequence[str] = KINDS) -> list[Instruction]:
    """`count` instructions, kinds in turn (round-robin over `kinds`), a pure function of (count, seed,
    split, kinds): train and test share no instruction text (see the module docstring).

    Each kind draws from its own stream, so a longer list extends a shorter one, and a kind's
    instructions are the same whichever other kinds are asked for."""
    _check("split", split, _SPLITS)
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty sequence of {', '.join(map(repr, KINDS))}, not {kinds!r}")
    for kind in kinds:
        _check("kind", kind, KINDS)
    if count < 0:
        raise ValueError(f"count must be at least 0, not {count}")
    rngs = {kind: random.Random(f"instructions:{seed}:{split}:{kind}") for kind in kinds}
    return [rngs[kind].choice(_space(kind, split)) for kind in (kinds[i % len(kinds)] for i in range(count))]


def _speech_lines(text: str) -> list[str]:
    """A work's lines of speech: after a play's cast list, without headings or stage directions."""
    start = _START.search(text)
    kept, opening = [], True  # whether a line opens a block, after a blank line or a stage direction
    for line in text[start.start() if start else 0 :].splitlines():
        line = line.strip()
        if "  " in line or "\t" in line:
            line = " ".join(line.split())
        if not line or "[" in line or "]" in line or line.startswith(_SKIP):
            opening = True
            continue
        if not (opening and _HEADING.fullmatch(line)):  # a speaker's heading: "Ber.", "MRS. PAGE."
            kept.append(line)
        opening = False
    return kept


def _sentence_words(text: str) -> int:
    """A piece of a line's words if it may be a demonstration (see the module docstring), else 0."""
    if (
        not text
        or len(text) > _MAX_CHARS
        or text[-1] not in ".!?"
        or not (text[0].isupper() or _QUOTED.match(text))
        or _CAPITALS.search(text) is not None
        or text.count('"') % 2
    ):
        return 0
    count = _count_words(text)
    return count if 2 <= count <= _MAX_WORDS else 0


@functools.cache
def _sentences() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Every short sentence of the works (see the module docstring), once, sorted by word count; and
    for each n, how many have at most n words (so the first ends[n] answer "at most n words")."""
    pieces = set()
    for text in works().values():
        for line in _speech_lines(text):
            if ". " in line or "! " in line or "? " in line:
                pieces.update(_SENTENCE_END.split(line))
            elif len(line) <= _MAX_CHARS:
                pieces.add(line)
    counted = sorted((n, s) for s in pieces if (n := _sentence_words(s)))
    ends = tuple(bisect.bisect_right(counted, (n, "\U0010ffff")) for n in range(_MAX_WORDS + 1))
    return tuple(s for _, s in counted), ends


@functools.cache
def _index() -> dict[str, tuple[str, ...]]:
    """{word: the short sentences that include it}."""
    index = collections.defaultdict(list)
    for sentence in _sentences()[0]:
        for word in _words(sentence):
            index[word].append(sentence)
    return {word: tuple(sentences) for word, sentences in index.items()}


@functools.cache
def _questions() -> tuple[str, ...]:
    return tuple(s for s in _sentences()[0] if s.endswith("?"))


def demonstration(instruction: Instruction, seed: int) -> str:
    """A response that scores 1, taken from the shipped works (a pure function of the instruction and seed)."""
    kind, target = instruction.kind, instruction.target
    if kind == "sum":
        return str(target)
    rng = random.Random(f"demonstration:{seed}:{kind}:{target!r}:{instruction.text}")
    if kind == "words":  # the first ends[n] sentences have at most n words
        pool, ends = _sentences()
        size = ends[max(0, min(target, _MAX_WORDS))]
    else:
        pool = _index().get(target, ()) if kind == "include" else _questions()
        size = len(pool)
    if not size:
        raise ValueError(f"no short sentence of the works complies with {instruction}")
    return pool[rng.randrange(size)]
