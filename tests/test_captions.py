"""Template captions: articles, determinism, and that label_of reads every generated text back to its class."""

import pytest

from zoo.data.captions import (
    CAPTION_TEMPLATES,
    NOUNS,
    QUESTIONS,
    caption,
    captions,
    label_of,
    question_answer,
    questions_answers,
    zero_shot_prompts,
)
from zoo.data.images import FASHION_MNIST_CLASSES

LABELS = range(len(FASHION_MNIST_CLASSES))


def test_articles_and_nouns():
    assert len(NOUNS) == len(FASHION_MNIST_CLASSES) == 10
    assert caption(9) == "a photo of an ankle boot"
    assert caption(0) == "a photo of a t-shirt"
    assert caption(1, 3) == "A pair of trousers."
    assert question_answer(9, 0) == ("What is this?", "An ankle boot.")
    assert question_answer(7, 2) == ("Name the item.", "Sneaker.")
    for label in LABELS:
        for template in range(len(CAPTION_TEMPLATES)):
            assert NOUNS[label] in caption(label, template)


@pytest.mark.parametrize("label", LABELS)
def test_label_of_inverts_every_caption_and_answer(label):
    for template in range(len(CAPTION_TEMPLATES)):
        assert label_of(caption(label, template)) == label
    for question in range(len(QUESTIONS)):
        text, answer = question_answer(label, question)
        assert label_of(answer) == label
        assert label_of(text) is None  # the question does not give the answer away
    assert label_of(zero_shot_prompts()[label]) == label


def test_label_of_phrases():
    assert label_of("a shirt") == 6
    assert label_of("a t-shirt") == 0
    assert label_of("AN ANKLE BOOT") == 9
    assert label_of("Trousers.") == 1
    assert label_of("a shirt and a bag") is None
    assert label_of("a t-shirt next to a shirt") is None
    assert label_of("a photo of a hat") is None
    assert label_of("") is None
    assert label_of("a bagel") is None  # a class noun inside another word is not that class
    assert label_of("a dress and another dress") == 3


def test_captions_deterministic_and_varied():
    labels = [i % 10 for i in range(100)]
    first = captions(labels, seed=0)
    assert len(first) == len(labels)
    assert captions(labels, seed=0) == first
    assert captions(labels, seed=1) != first
    used = {t for text, label in zip(first, labels) for t in range(len(CAPTION_TEMPLATES)) if caption(label, t) == text}
    assert len(used) > 1
    assert [label_of(text) for text in first] == labels
    assert captions([], seed=0) == []


def test_questions_answers_deterministic_and_varied():
    labels = [i % 10 for i in range(100)]
    first = questions_answers(labels, seed=0)
    assert len(first) == len(labels)
    assert questions_answers(labels, seed=0) == first
    assert questions_answers(labels, seed=1) != first
    assert len({question for question, _ in first}) > 1
    assert [label_of(answer) for _, answer in first] == labels


def test_zero_shot_prompts():
    prompts = zero_shot_prompts()
    assert len(prompts) == len(set(prompts)) == 10
    assert [label_of(p) for p in prompts] == list(LABELS)
    assert prompts[9] == "a photo of an ankle boot"
    assert zero_shot_prompts("{Noun}")[1] == "Pair of trousers"
