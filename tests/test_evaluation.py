"""zoo.evaluation: the harness's scores equal direct computations from the model's logits, batching
changes no number, acc and acc_norm pick as their definitions say, prompts fit the context and
never hold the evaluated document, and the self-consistency vote breaks ties deterministically."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources.array_record import ArrayRecordDataSource

from zoo import configs
from zoo.data import shakespeare
from zoo.evaluation import consistency, harness, prompts, tasks
from zoo.models.gpt import GPT
from zoo.tokenizer import train_byte_level_bpe

TEXT = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree.\n" * 30
CONTEXT = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_byte_level_bpe([TEXT], tmp_path_factory.mktemp("bpe") / "tokenizer.json", 320)


@functools.cache
def tiny(vocab_size: int, context_length: int = CONTEXT):
    cfg = configs.gpt(
        "gpt2-small",
        num_layers=2,
        d_model=32,
        num_heads=4,
        d_ff=64,
        context_length=context_length,
        vocab_size=vocab_size,
    )
    model = GPT(cfg)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def direct(model, params, ids: list[int], cut: int) -> tuple[float, bool]:
    """The log-probability of ids[cut:] after ids[:cut] from one model.apply, and whether each was the argmax."""
    logits = model.apply({"params": params}, jnp.asarray([ids[:-1]]))[0]  # the last token predicts nothing
    logp = jax.nn.log_softmax(logits)
    steps = range(cut - 1, len(ids) - 1)
    return sum(float(logp[i, ids[i + 1]]) for i in steps), all(int(jnp.argmax(logits[i])) == ids[i + 1] for i in steps)


def test_loglikelihood_is_the_continuations_log_probability_under_the_model(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    for context, continuation in [("The cat sat on", " the mat."), ("A bird", " sang"), ("The dog", "sat")]:
        whole = tokenizer.encode(context + continuation)
        cut = len(tokenizer.encode(context))
        [(logp, greedy)] = harness.loglikelihood(model, params, tokenizer, [(context, continuation)])
        expected_logp, expected_greedy = direct(model, params, whole, cut)
        assert logp == pytest.approx(expected_logp, abs=1e-5) and greedy == expected_greedy


def test_a_contexts_trailing_space_moves_to_the_continuation(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    moved, kept = harness.loglikelihood(model, params, tokenizer, [("The cat sat ", "on"), ("The cat sat", " on")])
    assert moved == pytest.approx(kept, abs=1e-6)
    assert harness.split_request(tokenizer, "The cat sat ", "on") == harness.split_request(
        tokenizer, "The cat sat", " on"
    )


def test_an_empty_context_is_the_end_of_text_token(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    [(logp, _)] = harness.loglikelihood(model, params, tokenizer, [("", "The cat")])
    ids = tokenizer.encode("The cat")
    assert logp == pytest.approx(direct(model, params, [tokenizer.eos_id, *ids], 1)[0], abs=1e-5)


def test_batching_gives_the_numbers_of_one_request_at_a_time(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    requests = [
        ("The cat", " sat on the mat."),
        ("A", " bird"),
        (TEXT[:200], " The dog"),
        ("The dog sat on", " the log"),
    ]
    together = harness.loglikelihood(model, params, tokenizer, requests, batch_size=4)
    alone = [harness.loglikelihood(model, params, tokenizer, [r], batch_size=1)[0] for r in requests]
    np.testing.assert_allclose([s for s, _ in together], [s for s, _ in alone], atol=1e-5)
    assert [g for _, g in together] == [g for _, g in alone]


def test_a_context_longer_than_the_model_keeps_its_last_tokens(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    context, continuation = TEXT[:400], " The cat"
    ids = tokenizer.encode(context + continuation)
    n = len(ids) - len(tokenizer.encode(context))
    [(logp, _)] = harness.loglikelihood(model, params, tokenizer, [(context, continuation)])
    assert logp == pytest.approx(direct(model, params, ids[-(CONTEXT + 1) :], CONTEXT + 1 - n)[0], abs=1e-5)


def test_acc_takes_the_highest_sum_and_acc_norm_the_highest_per_character():
    assert harness.choice_scores([-4.0, -3.0], [" a much longer choice", " b"]) == (1, 0)
    assert harness.choice_scores([-1.0, -3.0], [" ab", " b"]) == (0, 0)


def test_multiple_choice_scores_each_question(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    questions = [harness.MultipleChoice("The cat sat on the", (" mat.", " log.", " tree."), a) for a in range(3)]
    scores = harness.multiple_choice(model, params, tokenizer, questions)
    assert scores["acc"] == pytest.approx(1 / 3) and scores["acc_norm"] == pytest.approx(1 / 3)


def test_perplexity_of_a_short_text_is_its_log_likelihood_after_end_of_text(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    text = "The cat sat on the mat."
    ids = tokenizer.encode(text)
    nll = -direct(model, params, [tokenizer.eos_id, *ids], 1)[0]
    scores = harness.perplexity(model, params, tokenizer, text)
    assert scores["token_perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)
    assert scores["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text), rel=1e-5)


def test_perplexity_windows_cover_every_token_once(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    text = TEXT[:600]
    ids = tokenizer.encode(text)
    assert len(ids) > 2 * CONTEXT
    windows = [
        (ids[max(0, s - CONTEXT) : s] or [tokenizer.eos_id], ids[s : s + CONTEXT]) for s in range(0, len(ids), CONTEXT)
    ]
    nll = -sum(logp for logp, _ in harness.score_tokens(model, params, windows))
    assert harness.perplexity(model, params, tokenizer, text)["token_perplexity"] == pytest.approx(
        math.exp(nll / len(ids)), rel=1e-5
    )


def test_generation_is_cut_at_the_first_stop_string():
    assert harness.cut_at("12 + 3\nQ: next", ["\n", "Q:"]) == "12 + 3"
    assert harness.cut_at("no stop here", ["\n"]) == "no stop here"
    assert harness.extract_number("so 3 + 4 = 7. The answer is 7.") == "7"
    assert harness.extract_number("no answer") is None


# --- prompts ---------------------------------------------------------------------------------


def examples(n: int, prefix: str = "q") -> list[prompts.Example]:
    return [prompts.Example(f"{prefix}{i}", f"Q: what is {i} plus {i}?\nA:", f" {2 * i}") for i in range(n)]


def test_prompts_fit_the_context_and_say_how_many_shots_fit(tokenizer):
    train, doc = examples(50), examples(1, "test")[0]
    budget = len(tokenizer.encode(doc.question + doc.answer))
    for length, reserve in [(budget, 0), (budget + 40, 0), (budget + 200, 8), (4000, 0)]:
        prompt = prompts.few_shot(tokenizer, doc, train, 10, context_length=length, tail=doc.answer, reserve=reserve)
        assert len(tokenizer.encode(prompt.text + doc.answer)) + reserve <= length
        assert prompt.text.count("Q:") == prompt.shots + 1 and prompt.text.endswith(doc.question)
    assert prompt.shots == 10  # a roomy context fits all that were asked for
    assert prompts.few_shot(tokenizer, doc, train, 3, context_length=budget - 1, tail=doc.answer) is None
    question = len(tokenizer.encode(doc.question))  # generation: the prompt and the tokens it may add
    assert prompts.few_shot(tokenizer, doc, train, 3, context_length=question + 5, reserve=5).shots == 0


def test_shots_never_hold_the_evaluated_document_and_are_deterministic(tokenizer):
    train = examples(20)
    for doc in train[:5]:  # evaluating on the training split itself: its own document is excluded
        prompt = prompts.few_shot(tokenizer, doc, train, 19, context_length=10_000, seed=7)
        assert prompt.shots == 19 and prompt.text.count(doc.question) == 1
        assert prompt == prompts.few_shot(tokenizer, doc, train, 19, context_length=10_000, seed=7)
    one, four = (prompts.draw(train, train[0], k, seed=7) for k in (1, 4))
    assert four[:1] == one and prompts.draw(train, train[0], 4, seed=8) != four


# --- tasks -----------------------------------------------------------------------------------


def test_synthetic_tasks_hold_true_answers_and_disjoint_splits():
    for op, digits in [("+", 2), ("-", 3)]:
        task = tasks.arithmetic(op, digits, count=50)
        assert not {e.question for e in task.train} & {e.question for e in task.test}
        for e in task.test:
            a, word, b = re.search(r"What is (\d+) (plus|minus) (\d+)\?", e.question).groups()
            assert len(a) == len(b) == digits
            assert int(e.answer) == (int(a) + int(b) if word == "plus" else int(a) - int(b))
    task = tasks.unscramble(TEXT.split() + "beautiful morning sunshine thunder lightning".split(), count=3)
    for e in task.test + task.train:
        scrambled, word = e.question.removesuffix(" ="), e.answer.strip()
        assert sorted(scrambled) == sorted(word) and (scrambled[0], scrambled[-1]) == (word[0], word[-1])


def test_chain_of_thought_solutions_compute_their_answers():
    task = tasks.chain_of_thought(count=40)
    for e in task.test:
        for a, op, b, result in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", e.answer):
            assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        steps = re.findall(r"= (\d+)\.", e.answer)
        assert task.extract(e.answer) == steps[-1] and len(steps) in (2, 3)


def test_shakespeare_tasks_come_from_their_plays():
    works = shakespeare.works()
    cloze, choice = tasks.shakespeare_tasks({"hamlet": works["hamlet"]}, {"macbeth": works["macbeth"]})
    assert all(e.id.startswith("macbeth/") for e in cloze.test + choice.test)
    assert all(e.id.startswith("hamlet/") for e in cloze.train + choice.train)
    for e in cloze.test[:50]:
        assert (
            re.fullmatch(r" [A-Za-z]+", e.answer)
            and (e.question + e.answer).replace("\n", " ").split()[-1] in works["macbeth"]
        )
    for e in choice.test[:50]:
        assert len(set(e.choices)) == 4 and e.answer in e.choices and e.question + e.answer in works["macbeth"]


def test_every_task_kind_evaluates_on_a_model(tokenizer):
    model, params = tiny(tokenizer.vocab_size, 256)
    works = shakespeare.works()
    short = {"macbeth": works["macbeth"][:20_000]}
    for task in [*tasks.shakespeare_tasks(short, short), tasks.arithmetic("+", 2, count=4)]:
        for shots in (0, 2):
            result = tasks.evaluate(model, params, tokenizer, task, shots, limit=4)
            assert result["documents"] + result["skipped"] == 4 and 0 <= result["acc"] <= 1
            assert result["fit"] <= shots


def test_any_tfds_text_dataset_is_a_cloze_task(monkeypatch):
    """The path for machines that download (LAMBADA); tfds's mock data stands in for it."""
    monkeypatch.setattr(ArrayRecordDataSource, "__getitems__", lambda self, keys: [self[key] for key in keys])
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        task = tasks.tfds_cloze("lambada", feature="passage")
    assert task.kind == "cloze" and 0 < len(task.test) <= 5 and all(e.answer.startswith(" ") for e in task.test)


# --- self-consistency ------------------------------------------------------------------------


def test_the_vote_takes_the_majority_and_breaks_ties_by_the_first_sampled():
    assert consistency.vote(["3", "4", "4", None]) == consistency.Vote("4", 0.5, ("3", "4", "4", None))
    assert consistency.vote(["4", "3", "3", "4"]).answer == "4"
    assert consistency.vote([None, "3", "4"]).answer == "3"
    assert consistency.vote([None, None]) == consistency.Vote(None, 0.0, (None, None))
    assert consistency.vote(["7"]) == consistency.Vote("7", 1.0, ("7",))


def test_self_consistency_votes_over_k_sampled_paths(tokenizer):
    model, params = tiny(tokenizer.vocab_size)
    votes = consistency.self_consistency(
        model, params, tokenizer, ["The cat", "A bird"], 5, temperature=1.0, rng=jax.random.key(0),
        extract=lambda text: text.split()[0] if text.split() else None, max_new_tokens=4,
    )  # fmt: skip
    assert len(votes) == 2 and all(len(v.answers) == 5 for v in votes)
    for v in votes:
        assert v.answer is None or v.agreement == v.answers.count(v.answer) / 5
