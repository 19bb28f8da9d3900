"""GPT-1's fine-tuning: special tokens grow the vocabulary without touching it, each input transform
frames its texts as the paper's figure 1 does, long inputs are cut by the documented rule, and
the loss is the task's cross-entropy plus λ times the per-sequence LM loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import sharding, tasks
from zoo.adaptation import finetune
from zoo.data.labelled import Example
from zoo.models.gpt import GPT, GPTConfig
from zoo.tokenizer import TextTokenizer
from zoo.train import recipes
from zoo.train.loop import LoopConfig, train

CFG = GPTConfig(vocab_size=40, context_length=12, num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout=0.0)


class Letters(TextTokenizer):
    """a-z as ids 1-26, anything else as 27; 0 pads."""

    FILE_NAME = "letters"

    def encode(self, text):
        return [ord(c) - 96 if "a" <= c <= "z" else 27 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 96) if 1 <= i <= 26 else "_" for i in ids)

    vocab_size, eos_id, pad_id = 28, 27, 0

    def serialized(self):
        return b"letters"


@pytest.fixture(scope="module")
def grown():
    params = nn.unbox(GPT(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    cfg, new, tokenizer = finetune.add_special_tokens(CFG, params, Letters(), jax.random.key(1), multiple_of=8)
    return params, cfg, new, tokenizer


def test_special_tokens_are_new_rows_after_the_vocabulary(grown):
    params, cfg, new, tokenizer = grown
    assert cfg.vocab_size == 48  # 40 + 3, up to a multiple of 8
    assert (tokenizer.start, tokenizer.delimiter, tokenizer.extract) == (40, 41, 42)
    old, rows = params["token_embed"]["embedding"], new["token_embed"]["embedding"]
    np.testing.assert_array_equal(rows[:40], old)
    assert 0.005 < float(jnp.std(rows[40:])) < 0.05  # N(0, 0.02), not zeros
    logits = GPT(cfg).apply({"params": new}, jnp.array([[1, 40, 2, 42]]))
    assert logits.shape == (1, 4, 48)  # the tied output layer scores the new tokens too
    assert tokenizer.decode([40, 1, 2, 41, 3, 42]) == "<|start|>ab<|delimiter|>c<|extract|>"
    assert tokenizer.encode("ab") == [1, 2] and tokenizer.vocab_size == 43


def ids(tokenizer, text):
    return tokenizer.encode(text)


@pytest.mark.parametrize(
    ("kind", "texts", "expected"),
    [
        ("classification", ("abc",), [["S", "abc", "E"]]),
        ("entailment", ("ab", "cd"), [["S", "ab", "D", "cd", "E"]]),
        ("similarity", ("ab", "cd"), [["S", "ab", "D", "cd", "E"], ["S", "cd", "D", "ab", "E"]]),
        ("choice", ("ab", "x", "yz"), [["S", "ab", "D", "x", "E"], ["S", "ab", "D", "yz", "E"]]),
    ],
)
def test_each_transform_frames_its_texts(grown, kind, texts, expected):
    *_, tokenizer = grown
    batch, cut = finetune.encode(kind, [Example(texts, 1)], tokenizer, 12)
    specials = {"S": [tokenizer.start], "D": [tokenizer.delimiter], "E": [tokenizer.extract]}
    for c, parts in enumerate(expected):
        sequence = [i for part in parts for i in specials.get(part, ids(tokenizer, part))]
        np.testing.assert_array_equal(batch["tokens"][0, c, : len(sequence)], sequence)
        assert not batch["tokens"][0, c, len(sequence) :].any() and batch["mask"][0, c].sum() == len(sequence)
        assert batch["extract"][0, c] == len(sequence) - 1
    assert batch["tokens"].shape == (1, len(expected), 12) and batch["label"].tolist() == [1] and cut == 0


def test_too_long_inputs_lose_tokens_from_the_longest_text(grown):
    *_, tokenizer = grown
    examples = [Example(("abcdefghij", "klmno"), 0), Example(("ab", "c"), 1)]
    batch, cut = finetune.encode("entailment", examples, tokenizer, 12)
    # 9 tokens for the texts: the premise (10) is cut to 5, then the tie goes against it too: its last 4
    row = tokenizer.decode(batch["tokens"][0, 0, : int(batch["mask"][0, 0].sum())])
    assert row == "<|start|>ghij<|delimiter|>klmno<|extract|>" and cut == 1
    with pytest.raises(ValueError, match="needs 2"):
        finetune.encode("entailment", [Example(("ab",), 0)], tokenizer, 12)


def test_lm_loss_averages_each_sequence_over_its_real_tokens():
    logits = jax.random.normal(jax.random.key(0), (2, 1, 4, 5))
    tokens = jnp.array([[[1, 2, 3, 0]], [[4, 1, 0, 0]]])
    mask = jnp.array([[[1, 1, 1, 0]], [[1, 1, 0, 0]]], jnp.float32)
    logp = np.asarray(jax.nn.log_softmax(logits))
    first = -(logp[0, 0, 0, 2] + logp[0, 0, 1, 3]) / 2  # targets 2, 3 (the padding target is masked)
    second = -logp[1, 0, 0, 1]  # target 1
    np.testing.assert_allclose(finetune.lm_loss(logits, tokens, mask), (first + second) / 2, rtol=1e-6)


@pytest.fixture(scope="module")
def similarity(grown):
    _, cfg, new, tokenizer = grown
    model = finetune.Classifier(cfg, "similarity", num_classes=2)
    batch, _ = finetune.encode("similarity", [Example(("abc", "de"), 1), Example(("de", "abc"), 0)], tokenizer, 12)
    params = nn.unbox(model.init(jax.random.key(2), batch)["params"])
    params = {**params, "gpt": new, "head": jax.tree.map(lambda x: x + 0.3, params["head"])}
    return model, params, batch


def test_similarity_scores_both_orders_alike(similarity):
    model, params, batch = similarity
    logits, lm = model.apply({"params": params}, batch)
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5)
    assert lm.shape == (2, 2, 12, 48)


def test_the_loss_is_the_task_loss_plus_lambda_times_the_lm_loss(similarity):
    model, params, batch = similarity
    logits, lm = model.apply({"params": params}, batch)
    task = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), batch["label"][:, None], 1))
    aux = finetune.lm_loss(lm, batch["tokens"], batch["mask"])
    alone, accuracy = finetune.loss(0.0)(model, params, batch)
    np.testing.assert_allclose(alone, task, rtol=1e-5)
    np.testing.assert_allclose(finetune.loss(0.5)(model, params, batch)[0], task + 0.5 * aux, rtol=1e-5)
    assert float(accuracy) == 0.5  # one logit pair for both examples, labels 1 and 0


def test_choice_scores_follow_their_options(grown):
    _, cfg, new, tokenizer = grown
    model = finetune.Classifier(cfg, "choice", num_classes=3)
    examples = [Example(("ab", "c", "de", "f"), 2), Example(("ab", "f", "c", "de"), 1)]  # the same options, rotated
    batch, _ = finetune.encode("choice", examples, tokenizer, 12)
    params = {**nn.unbox(model.init(jax.random.key(2), batch)["params"]), "gpt": new}
    logits, _ = model.apply({"params": params}, batch)
    np.testing.assert_allclose(logits[1], logits[0][np.array([2, 0, 1])], rtol=1e-5)
    assert finetune.predict(model, params, batch, batch_size=3).shape == (2,)


def test_a_run_starts_from_the_pretrained_weights_it_is_given(grown, tmp_path):
    _, cfg, new, tokenizer = grown
    model = finetune.Classifier(cfg, "classification", num_classes=2)
    examples = [Example(("abc",), 0), Example(("xyz",), 1)] * 4
    batch, _ = finetune.encode("classification", examples, tokenizer, 12)
    task = tasks.text_classifier(model, batch, batch, global_batch=8, seed=0, lm_weight=0.5)
    task.start_params = lambda fresh: {**fresh, "gpt": new}
    recipe = recipes.Recipe(1e-3, 1, 2, 0.1, 0.0, (0.9, 0.999))  # step 1's rate is 0: nothing moves
    optimizer, loop = recipes.optimizer(recipe), LoopConfig(1, progress=False)
    summary = train(task, optimizer, sharding.mesh_for("data=1", jax.devices()[:1]), tmp_path, loop, {})
    jax.tree.map(np.testing.assert_array_equal, summary["state"]["params"]["gpt"], new)
    assert 0 <= summary["eval_accuracy"] <= 1
