"""zoo.evaluation: the harness's scores equal direct computations from the model's logits, batching
changes no number, acc and acc_norm pick as their definitions say, prompts fit the context and
never hold the evaluated document, and the self-consistency vote breaks ties deterministically."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import configs
from zoo.evaluation import harness
from zoo.models.gpt import GPT
from zoo.tokenizer import train_byte_level_bpe

TEXT = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree.\n" * 30
CONTEXT = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_byte_level_bpe([TEXT], tmp_path_factory.mktemp("bpe") / "tokenizer.json", 320)


@functools.cache
def tiny(vocab_size: int):
    cfg = configs.gpt(
        "gpt2-small", num_layers=2, d_model=32, num_heads=4, d_ff=64, context_length=CONTEXT, vocab_size=vocab_size
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
