"""Supervised Shakespeare tasks: every label is checked against the printed text, looked up directly
(stage directions cut, whitespace squeezed), not through the parser that built the examples."""

import collections
import re

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources.array_record import ArrayRecordDataSource

from zoo.data import labelled
from zoo.data.labelled import GENRES, SPLITS, TEST_WORKS, Example, Speech
from zoo.data.shakespeare import works


def flat(text: str) -> str:
    """Text with bracketed stage directions cut (nested ones, and the ends of one left on a line), and
    its words (with letters: "--" and a "," left alone by a direction are not) joined by single spaces:
    any printed run of spoken lines is a substring of its work's."""
    while (cut := re.sub(r"[\[{][^\[\]{}]*[\]}]", "", text)) != text:
        text = cut
    text = re.sub(r"[\[{][^\n]*|^[^\]}\n]*[\]}]", "", text, flags=re.MULTILINE)
    return " ".join(re.sub(r"(?<!\S)[^A-Za-z\s]+(?!\S)", "", text).split())


@pytest.fixture(scope="module")
def printed():
    return {name: flat(text) for name, text in works().items()}


@pytest.fixture(scope="module")
def tasks():
    return labelled.shakespeare_tasks(seed=0, scale=0.1)


def sources(text: str, printed: dict[str, str]) -> set[str]:
    """The works that print `text`."""
    return {name for name, words in printed.items() if flat(text) in words}


def splits(task):
    return {"train": task.train, "test": task.test}


def test_every_work_has_a_genre_and_every_genre_has_train_and_test_works():
    assert set(GENRES) == set(works()) and set(GENRES.values()) == set(labelled.GENRE_CLASSES)
    assert GENRES["cymbeline"] == GENRES["troilus_and_cressida"] == "tragedy" and GENRES["tempest"] == "comedy"
    assert {"macbeth", "tempest"} <= set(TEST_WORKS) <= set(GENRES)
    for split, names in SPLITS.items():
        assert {GENRES[n] for n in names} == set(labelled.GENRE_CLASSES), split
    assert set(SPLITS["train"]) == set(GENRES) - set(TEST_WORKS) and len(SPLITS["train"]) >= 30


def test_a_play_parses_into_speeches_without_its_cast_list_or_stage_directions():
    hamlet = labelled.speeches("hamlet")
    assert hamlet[:2] == (  # not "Claudius, King of Denmark." and the rest of the cast list
        Speech("Ber", ("Who's there?",)),
        Speech("Fran", ("Nay, answer me: stand, and unfold yourself.",)),
    )
    i = hamlet.index(Speech("Hor", ("Stay! speak, speak! I charge thee speak!",)))
    assert hamlet[i + 1] == Speech("Mar", ("'Tis gone, and will not answer.",))  # "[Exit Ghost.]" between them
    assert Speech("Ham", ("A little more than kin, and less than kind!",)) in hamlet  # "[Aside.] A little more..."
    assert labelled.speeches("midsummer_nights_dream")[0].speaker == "THESEUS"  # a heading without its period
    for name, genre in GENRES.items():
        said = labelled.speeches(name)
        assert said and all(s.lines for s in said), name
        assert not any(re.search(r"[\[\]{}]", line) for s in said for line in s.lines), name
        assert all((s.speaker is None) == (genre == "poem") for s in said), name


def test_a_poem_parses_into_stanzas_after_its_title_dedication_and_argument():
    sonnets = labelled.speeches("sonnets")
    assert len(sonnets) == 154 and sonnets[0].lines[0] == "From fairest creatures we desire increase,"
    lucrece = labelled.speeches("rape_of_lucrece")
    assert lucrece[0].lines[0] == "From the besieged Ardea all in post," and {len(s.lines) for s in lucrece} == {7}


def test_tasks_are_deterministic_in_the_seed(tasks):
    assert labelled.shakespeare_tasks(seed=0, scale=0.1) == tasks
    again = labelled.shakespeare_tasks(seed=1, scale=0.1)
    assert all(again[name].train != task.train for name, task in tasks.items())


def test_scale_multiplies_the_per_work_counts(tasks):
    for name in ("genre", "same_play", "next_line"):
        assert len(tasks[name].test) == 6 * len(TEST_WORKS)  # round(60 * 0.1) from each test work
    assert len(tasks["speaker"].test) == 6 * (len(TEST_WORKS) - 1)  # Lucrece has no speakers


def test_a_genre_passage_comes_from_one_work_of_its_split_and_of_that_genre(tasks, printed):
    task = tasks["genre"]
    assert task.kind == "classification" and task.classes == ("comedy", "tragedy", "history", "poem")
    for split, examples in splits(task).items():
        for e in examples:
            (found,) = sources(e.texts[0], printed)
            assert found in SPLITS[split] and GENRES[found] == task.classes[e.label]
            assert len(e.texts[0].split("\n")) == 4


def test_same_play_says_whether_both_passages_come_from_one_work(tasks, printed):
    task = tasks["same_play"]
    assert task.kind == "similarity" and task.classes == ("different", "same")
    for split, examples in splits(task).items():
        for e in examples:
            (a,), (b,) = (sources(text, printed) for text in e.texts)
            assert {a, b} <= set(SPLITS[split]) and e.label == (a == b) and e.texts[0] != e.texts[1]
        assert sum(e.label for e in examples) == len(examples) / 2


def said_by(name: str, speech: str, printed: str) -> bool:
    """Whether `name` is printed as the heading of a speech that opens with `speech`."""
    return re.search(rf"(?<!\w){re.escape(flat(name))}\.? {re.escape(flat(speech))}", printed) is not None


def test_speaker_says_whether_the_named_speaker_says_the_speech(tasks, printed):
    task = tasks["speaker"]
    assert task.kind == "entailment" and task.classes == ("no", "yes")
    for split, examples in splits(task).items():
        for e in examples:
            speech, hypothesis = e.texts
            name = hypothesis.removesuffix(" says this.")
            found = sources(speech, {n: printed[n] for n in SPLITS[split]})  # "Anon." is printed in several
            assert any(said_by(name, speech, printed[n]) for n in found) == bool(e.label), (speech, name)
            assert any(sum(s.speaker == name for s in labelled.speeches(n)) >= labelled.MIN_SPEECHES for n in found)


def test_a_false_speaker_is_never_a_name_the_true_one_goes_by():
    assert labelled.alike("henry_v", "KING", "KING HENRY") and labelled.alike("lear", "Glou", "GLOUCESTER")
    assert labelled.alike("richard_iii", "GLOSTER", "KING RICHARD")  # Richard of Gloucester, crowned
    assert not labelled.alike("henry_vi_part_2", "GLOSTER", "RICHARD")  # Duke Humphrey and York's son
    assert not labelled.alike("hamlet", "Ham", "Hor") and not labelled.alike("as_you_like_it", "ROSALIND", "CELIA")
    assert labelled.alike("henry_iv_part_1", "1. CAR", "2. CAR")  # two carriers, but a shared word is enough


def test_next_line_offers_the_line_that_follows_the_context_among_distractors_that_do_not(tasks, printed):
    task = tasks["next_line"]
    assert task.kind == "choice" and task.classes == ("0", "1", "2", "3")
    for split, examples in splits(task).items():
        for e in examples:
            context, *options = e.texts
            assert len(context.split("\n")) == 3 and len(set(options)) == 4 and context and all(options)
            (found,) = sources(context, printed)
            follows = [f"{flat(context)} {flat(option)}" in printed[found] for option in options]
            assert found in SPLITS[split] and follows == [i == e.label for i in range(4)], (context, options)


def test_no_train_example_holds_a_passage_or_speech_of_a_test_work(tasks, printed):
    """Every passage, context and speech of more than one line: a single line ("Anon.", a next-line
    option) may be printed by several works."""
    test_works = {n: printed[n] for n in TEST_WORKS}
    for name, task in tasks.items():
        for e in task.train:
            for text in e.texts if name == "same_play" else e.texts[:1]:
                assert "\n" not in text or not sources(text, test_works), (name, text)


def test_full_size_tasks_are_large_balanced_and_cover_every_class():
    tasks = labelled.shakespeare_tasks()
    for name, task in tasks.items():
        assert len(task.train) >= 1500 and len(task.test) >= 300, name
        counts = collections.Counter(e.label for e in task.test)
        assert set(counts) == set(range(len(task.classes))), name
    assert collections.Counter(e.label for e in tasks["genre"].test) == {0: 120, 1: 120, 2: 120, 3: 60}
    for name in ("same_play", "speaker"):
        for examples in splits(tasks[name]).values():
            assert sum(e.label for e in examples) == len(examples) / 2, name
    positions = collections.Counter(e.label for e in tasks["next_line"].train)
    assert all(abs(n / len(tasks["next_line"].train) - 0.25) < 0.03 for n in positions.values())


# --- GLUE through tfds -----------------------------------------------------------------------


@pytest.fixture
def mock_glue(monkeypatch):
    """tfds's mock data, taken as prepared, with batch reads working (its mock source breaks
    `__getitems__`, tfds 4.9.10)."""
    monkeypatch.setattr(ArrayRecordDataSource, "__getitems__", lambda self, keys: [self[key] for key in keys])
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_glue_tasks_read_as_examples_of_their_kind(mock_glue):
    sst2 = labelled.tfds_task("glue/sst2", limit=3)
    assert sst2.kind == "classification" and sst2.classes == ("negative", "positive")
    assert len(sst2.train) == len(sst2.test) == 3 and {len(e.texts) for e in sst2.train + sst2.test} == {1}
    mrpc = labelled.tfds_task("glue/mrpc")
    assert mrpc.kind == "similarity" and mrpc.classes == ("not_equivalent", "equivalent")
    assert len(mrpc.train) == len(mrpc.test) == 5 and {len(e.texts) for e in mrpc.train + mrpc.test} == {2}
    mnli = labelled.tfds_task("glue/mnli")  # tested on its matched validation split
    assert mnli.kind == "entailment" and len(mnli.classes) == 3 and len(mnli.test) == 5
    for e in sst2.train + mrpc.test + mnli.test:
        assert isinstance(e, Example) and all(isinstance(t, str) for t in e.texts) and 0 <= e.label < 3


def test_a_glue_task_not_prepared_asks_for_a_tfds_build_and_downloads_nothing(tmp_path):
    with pytest.raises(ValueError, match="tfds build glue/rte"):
        labelled.tfds_task("glue/rte", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.array_record*"))
