"""Instructions with true scores (zoo.data.instructions): the rules by hand, demonstrations that
comply, deterministic round-robin instructions, and train and test splits that share no text."""

import re

import pytest

from zoo.data.instructions import KINDS, Instruction, demonstration, instructions, score

WORDS_3 = Instruction("words", "Reply in at most 3 words.", 3)
LOVE = Instruction("include", "Include the word 'love'.", "love")
SUM_42 = Instruction("sum", "17 + 25 =", 42)
QUESTION = Instruction("question", "End with a question.", "")


@pytest.mark.parametrize(
    ("instruction", "response", "expected"),
    [
        (WORDS_3, "To be", 1.0),
        (WORDS_3, "Not a whit.", 1.0),
        (WORDS_3, "", 0.0),
        (WORDS_3, " -- ! ", 0.0),  # punctuation alone has no words
        (WORDS_3, "Stand -- ho, there!", 1.0),  # "--" is not a word
        (WORDS_3, "a b c d", 1 - 1 / 3),
        (WORDS_3, "a b c d e", 1 - 2 / 3),
        (WORDS_3, "a b c d e f g", 0.0),
        (LOVE, "My Love!", 1.0),
        (LOVE, "love", 1.0),
        (LOVE, "O true-love, stay.", 1.0),
        (LOVE, "lovely", 0.0),
        (LOVE, "love's labour", 0.0),
        (LOVE, "I loved her.", 0.0),
        (LOVE, "", 0.0),
        (SUM_42, "42", 1.0),
        (SUM_42, "The answer is 42.", 1.0),
        (SUM_42, "40", 0.8),
        (SUM_42, "45 or 42", 0.7),  # the first integer counts
        (SUM_42, "-42", 0.0),
        (SUM_42, "52", 0.0),
        (SUM_42, "nothing", 0.0),
        (QUESTION, "Who goes there?", 1.0),
        (QUESTION, "  Who goes there?  \n", 1.0),
        (QUESTION, "?", 0.0),
        (QUESTION, "Go.", 0.0),
        (QUESTION, "Who? Go.", 0.0),
        (QUESTION, "", 0.0),
    ],
)
def test_score_by_hand(instruction, response, expected):
    assert score(instruction, response) == pytest.approx(expected)


@pytest.mark.parametrize("split", ["train", "test"])
def test_demonstrations_comply_and_are_short(split):
    batch = instructions(200, seed=5, split=split)
    for index, instruction in enumerate(batch):
        response = demonstration(instruction, seed=index)
        assert response.strip(), instruction
        assert len(response.split()) <= 12, (instruction, response)
        assert len(response) <= 80, (instruction, response)
        assert score(instruction, response) == 1.0, (instruction, response)


def test_demonstrations_are_deterministic_and_vary_with_seed():
    for instruction in instructions(8, seed=1):
        first = [demonstration(instruction, seed) for seed in range(20)]
        again = [demonstration(instruction, seed) for seed in range(20)]
        assert first == again
        if instruction.kind != "sum":
            assert len(set(first)) >= 10, (instruction, first)
        else:
            assert set(first) == {str(instruction.target)}


def test_demonstrations_of_words_fill_the_budget_variously():
    # Two-word budgets get two-word sentences; larger budgets also get longer ones.
    two = {demonstration(Instruction("words", "Use no more than 2 words.", 2), seed) for seed in range(50)}
    eight = {demonstration(Instruction("words", "Use no more than 8 words.", 8), seed) for seed in range(50)}
    assert {len(s.split()) for s in two} == {2}
    assert max(len(s.split()) for s in eight) >= 6
    assert min(len(s.split()) for s in eight) < 6


def test_demonstrations_are_sentences_of_speeches():
    from zoo.data.instructions import _sentences

    pool = set(_sentences()[0])
    assert len(pool) > 30_000
    # Whole lines and sentences within lines of speech are kept ...
    for kept in ("Who's there?", "Long live the king!", "'Tis now struck twelve.", "Cry, Troyans.", "Not a whit."):
        assert kept in pool, kept
    # ... speaker headings, stage directions, cast lists, scene headings and half sentences are not.
    dropped_ones = (
        *("Lady Capulet.", "First Serv.", "Exeunt.", "Claudius, King of Denmark.", "A platform before the Castle."),
        *("The bell then beating one,--", "abuse Robert Shallow, esquire."),
    )
    for dropped in dropped_ones:
        assert dropped not in pool, dropped
    assert "Bernardo?" not in pool  # one word alone is too often a name
    assert not [s for s in pool if "[" in s or re.search(r"\b[A-Z]{2,}", s) or s[-1] not in ".!?"]


def test_demonstration_of_an_unknown_word_raises():
    with pytest.raises(ValueError, match="no short sentence"):
        demonstration(Instruction("include", "Include the word 'xyzzy'.", "xyzzy"), seed=0)


def test_instructions_are_deterministic_and_depend_on_seed_and_split():
    first = instructions(40, seed=3)
    assert first == instructions(40, seed=3)
    assert first != instructions(40, seed=4)
    assert first != instructions(40, seed=3, split="test")


def test_instructions_take_kinds_in_turn_and_honour_count():
    assert instructions(0, seed=0) == []
    batch = instructions(11, seed=0)
    assert len(batch) == 11
    assert [i.kind for i in batch] == [KINDS[n % 4] for n in range(11)]
    some = instructions(7, seed=0, kinds=("sum", "question"))
    assert [i.kind for i in some] == ["sum", "question"] * 3 + ["sum"]
    # Each kind draws from its own stream: longer lists extend shorter ones, and a kind's
    # instructions do not depend on the other kinds asked for.
    assert instructions(30, seed=0)[:11] == batch
    assert [i for i in batch if i.kind == "sum"] == instructions(3, seed=0, kinds=("sum",))


def test_instructions_are_well_formed():
    for split in ("train", "test"):
        for instruction in instructions(400, seed=2, split=split):
            text, target = instruction.text, instruction.target
            assert 0 < len(text) < 60, text
            numbers = [int(n) for n in re.findall(r"\d+", text)]
            if instruction.kind == "words":
                assert numbers == [target] and 2 <= target <= 8, instruction
            elif instruction.kind == "include":
                assert target == target.lower() and f"'{target}'" in text, instruction
            elif instruction.kind == "sum":
                assert len(numbers) == 2 and all(0 <= n <= 49 for n in numbers), instruction
                assert sum(numbers) == target, instruction
            else:
                assert target == "", instruction


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_train_and_test_share_no_instruction_text(seed):
    train = instructions(800, seed=seed)
    test = instructions(800, seed=seed, split="test")
    train_texts, test_texts = {i.text for i in train}, {i.text for i in test}
    assert not train_texts & test_texts
    # Both splits have every kind and a variety of each.
    for kind in KINDS:
        assert len({i.text for i in test if i.kind == kind}) >= 2, kind
        assert len({i.text for i in train if i.kind == kind}) >= 4, kind
    # The held-out rules of the module docstring.
    assert all(i.target % 5 == 0 for i in test if i.kind == "sum")
    assert all(i.target % 5 for i in train if i.kind == "sum")
    assert not {i.target for i in test if i.kind == "include"} & {i.target for i in train if i.kind == "include"}


def test_test_split_recombines_what_train_has_seen():
    # "words": every N of the test split and every phrasing is also in train, but not the pairs.
    train = instructions(2000, seed=0, kinds=("words",))
    test = instructions(2000, seed=0, split="test", kinds=("words",))
    phrasing = lambda i: re.sub(r"\d+", "{n}", i.text)
    assert {i.target for i in test} == {i.target for i in train} == set(range(2, 9))
    assert {phrasing(i) for i in test} == {phrasing(i) for i in train}
    assert not {(phrasing(i), i.target) for i in test} & {(phrasing(i), i.target) for i in train}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "valid"}, r"split must be one of 'train', 'test'"),
        ({"kinds": ("words", "poem")}, r"kind must be one of 'words', 'include', 'sum', 'question'"),
        ({"kinds": ()}, r"kinds must be a non-empty sequence of 'words', 'include', 'sum', 'question'"),
        ({"kinds": "sum"}, r"kinds must be a non-empty sequence"),
    ],
)
def test_bad_arguments_raise_naming_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        instructions(4, seed=0, **kwargs)


def test_bad_kind_of_instruction_raises():
    with pytest.raises(ValueError, match="kind must be one of 'words', 'include', 'sum', 'question'"):
        Instruction("poem", "Write a sonnet.", "")
