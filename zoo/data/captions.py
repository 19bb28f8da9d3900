"""Template captions and question/answer pairs for Fashion-MNIST, generated from the true labels so that
caption accuracy is a measurable fact, and `label_of` to read a generated text back to its class.

    >>> caption(9)
    'a photo of an ankle boot'
    >>> question_answer(1, 2)
    ('Name the item.', 'Pair of trousers.')
    >>> label_of("An ankle boot."), label_of("a shirt and a bag")
    (9, None)
"""

import random
import re
from collections.abc import Sequence

from zoo.data.images import FASHION_MNIST_CLASSES

# The caption noun phrase of each class, keyed by its data set name so the order cannot drift.
NOUN_OF_CLASS = {
    "t-shirt/top": "t-shirt",
    "trouser": "pair of trousers",
    "pullover": "pullover",
    "dress": "dress",
    "coat": "coat",
    "sandal": "sandal",
    "shirt": "shirt",
    "sneaker": "sneaker",
    "bag": "bag",
    "ankle boot": "ankle boot",
}
NOUNS: tuple[str, ...] = tuple(NOUN_OF_CLASS[name] for name in FASHION_MNIST_CLASSES)
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {noun}",
    "an image of {a} {noun}",
    "a picture of {a} {noun}",
    "{A} {noun}.",
)
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is this?", "{A} {noun}."),
    ("What is shown here?", "{A} {noun}."),
    ("Name the item.", "{Noun}."),
)
# Every phrase read as naming a class: its caption noun, its data set name, and a bare plural.
ALIASES: dict[str, int] = {
    **{name: label for label, name in enumerate(FASHION_MNIST_CLASSES)},
    **{noun: label for label, noun in enumerate(NOUNS)},
    "trousers": FASHION_MNIST_CLASSES.index("trouser"),
}
# Longest phrase first, so "ankle boot" wins over any shorter phrase inside it; a phrase must stand alone
# (not inside a word or a hyphenated word), so "shirt" is not found in "t-shirt".
_ALIAS_RE = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(p) for p in sorted(ALIASES, key=len, reverse=True)) + r")(?![\w-])"
)


def _fill(template: str, label: int) -> str:
    """`template` with {a}/{A} (the article by the noun's first sound) and {noun}/{Noun} for class `label`."""
    noun = NOUNS[label]
    article = "an" if noun[0] in "aeiou" else "a"
    return template.format(a=article, A=article.capitalize(), noun=noun, Noun=noun[0].upper() + noun[1:])


def caption(label: int, template: int = 0) -> str:
    """The caption of class `label` by CAPTION_TEMPLATES[`template`]."""
    return _fill(CAPTION_TEMPLATES[template], label)


def captions(labels: Sequence[int], seed: int) -> list[str]:
    """Each label's caption with a template drawn per example: a pure function of (labels, seed)."""
    rng = random.Random(seed)
    return [caption(int(label), rng.randrange(len(CAPTION_TEMPLATES))) for label in labels]


def question_answer(label: int, question: int = 0) -> tuple[str, str]:
    """QUESTIONS[`question`] and its answer for class `label`."""
    text, answer = QUESTIONS[question]
    return text, _fill(answer, label)


def questions_answers(labels: Sequence[int], seed: int) -> list[tuple[str, str]]:
    """Each label's (question, answer) with a question drawn per example: a pure function of (labels, seed)."""
    rng = random.Random(seed)
    return [question_answer(int(label), rng.randrange(len(QUESTIONS))) for label in labels]


def all_texts() -> list[str]:
    """Every caption, question and answer the templates make, and the zero-shot prompts: the whole
    text of these tasks (e.g. to train a tokenizer on)."""
    labels = range(len(NOUNS))
    texts = [caption(label, t) for label in labels for t in range(len(CAPTION_TEMPLATES))]
    texts += [text for label in labels for q in range(len(QUESTIONS)) for text in question_answer(label, q)]
    return [*dict.fromkeys([*texts, *zero_shot_prompts()])]


def zero_shot_prompts(template: str = "a photo of {a} {noun}") -> list[str]:
    """One text per class, in class order, for zero-shot classification by text-image similarity."""
    return [_fill(template, label) for label in range(len(NOUNS))]


def label_of(text: str) -> int | None:
    """The single class named in `text` (case-insensitive, longest phrase first); None if none or several."""
    found = {ALIASES[match] for match in _ALIAS_RE.findall(text.lower())}
    return found.pop() if len(found) == 1 else None
