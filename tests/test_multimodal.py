"""Multimodal models: the prefix-LM mask against hand-written masks in every attention path;
ImageToText's batches, suffix-only loss, prefix-LM attention and generation against recomputation;
CLIP's and SigLIP's losses against numpy and on a sharded mesh; zero-shot classification; nested
config overrides; and towers started from transformers weights."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import random_qkv, relative_error

from zoo import configs, sharding
from zoo.generation import generate
from zoo.models import image_to_text, two_tower
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.image_to_text import ImageToText, ImageToTextConfig
from zoo.models.two_tower import TwoTower, TwoTowerConfig
from zoo.models.vit import ViTConfig
from zoo.nn import dot_product_attention as attn

VISION = ViTConfig(
    image_size=8, patch_size=4, num_channels=3, num_classes=2, num_layers=1, d_model=16, num_heads=2, d_ff=32
)
# Two layers: with one, a position's logits read only the layer's inputs, so the states after the prompt
# could not show whether the prompt attended both ways.
TEXT = GPTConfig(vocab_size=40, context_length=24, num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout=0.0)
IMAGE_TOKENS = 5  # [CLS] and 2 x 2 patches
IMAGES = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
EOS = 1
CAPTIONS = image_to_text.encode(
    IMAGES[:4],
    prompts=[[5, 6], [7], [8, 9, 10], [11, 12]],
    answers=[[13, 14, 15], [16, 17], [18], [19, 20, 21, 22]],
    eos_id=EOS,
    length=12,
)
_rng = np.random.default_rng(1)
PAIRS = {
    "image": IMAGES,
    "tokens": _rng.integers(2, TEXT.vocab_size, (8, 6)).astype(np.int32),
    "lengths": np.array([6, 1, 3, 5, 2, 6, 4, 3], np.int32),
}
EMBED_DIM = 12  # the embeddings of the 8 pairs are [8, 12], and nothing else in the two-tower program is


def random_params(model, *example):
    """(params of the model's tree and shapes drawn at random: no init program to compile, and a spread
    that makes a changed token show; the abstract boxed params, which carry their logical axis names)."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *example)["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        value = rng.normal(scale=0.2, size=leaf.shape) + (path[-1].key == "scale")  # LayerNorm scales near 1
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed)), boxed


@functools.cache
def captioner(pattern=("dense",)):
    model = ImageToText(ImageToTextConfig(VISION, dataclasses.replace(TEXT, attention_pattern=pattern, window=4)))
    params, boxed = random_params(model, IMAGES[:1], CAPTIONS["tokens"][:1, :-1], CAPTIONS["prompt_lengths"][:1])
    return model, params, boxed


@functools.cache
def two_towers(loss):
    pooling = "mean" if loss == "clip" else "last"
    model = TwoTower(TwoTowerConfig(VISION, TEXT, embed_dim=EMBED_DIM, text_pooling=pooling, loss=loss))
    params, boxed = random_params(model, IMAGES[:1], PAIRS["tokens"][:1], PAIRS["lengths"][:1])
    return model, params, boxed


@functools.cache
def caption_logits(model):
    return jax.jit(lambda params, images, tokens, lengths: model.apply({"params": params}, images, tokens, lengths))


class Compiled:
    """An ImageToText whose apply runs compiled (`caption_logits`). `image_to_text.loss` around it runs
    op by op, so no program is compiled for the loss itself."""

    def __init__(self, model):
        self.model = model

    def apply(self, variables, images, tokens, prompt_lengths):
        return caption_logits(self.model)(variables["params"], images, tokens, prompt_lengths)


def on_mesh(fn, params, boxed, batch, layout):
    """fn(params, batch) compiled for an 8-device mesh, the params laid out by the logical rules and the
    batch split over its data axes: (its result, the compiled program)."""
    mesh = sharding.mesh_for(layout)
    params = jax.device_put(params, sharding.logical_shardings(boxed, mesh))
    batch = sharding.shard_batch(batch, mesh)
    with sharding.sharding_context(mesh):
        compiled = jax.jit(fn).lower(params, batch).compile()
    return compiled(params, batch), compiled


# --------------------------------------------------------------------------------------
# The prefix-LM mask
# --------------------------------------------------------------------------------------

# Which keys (columns) each query (rows) of a 6-position sequence sees, for prefixes of 0, 3 and 6.
CAUSAL = [
    [1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1],
]
PREFIX_3 = [
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1],
]
WHOLE = [[1] * 6] * 6
# The same with a window of 2: a key within 1 position of the query, before it, or ahead inside the prefix.
CAUSAL_WINDOW_2 = [
    [1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [0, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 1, 1],
]
PREFIX_3_WINDOW_2 = [
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [0, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 1, 1],
]
WHOLE_WINDOW_2 = [
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 0],
    [0, 0, 0, 1, 1, 1],
    [0, 0, 0, 0, 1, 1],
]
PREFIXES = jnp.array([0, 3, 6])
ORDER = np.array([3, 0, 5, 1, 4, 2])


@functools.cache
def attention_weights():
    """{window: {implementation: attention weights [prefix, query, key position]}}, one program for all.
    With q = 0 every visible key gets the same weight, and v = one-hot(key position) turns the output
    into those weights. attention_at_positions gets the keys in the shuffled ORDER of a cache's slots."""
    length, head_dim = 6, 8
    shape = (3, length, 1, head_dim)
    one_hot = lambda positions: jnp.broadcast_to(jnp.eye(length, head_dim)[positions][None, :, None], shape)
    rows = lambda positions: jnp.broadcast_to(jnp.asarray(positions), (3, length))

    def of(window, q, k):
        out = {
            name: attn.attention(
                q, k, one_hot(np.arange(length)), window=window, bidirectional=PREFIXES, implementation=name
            )
            for name in ["dense", "xla"] + (["banded"] if window else [])
        }
        out["attention_at_positions"] = attn.attention_at_positions(
            q, k[:, ORDER], one_hot(ORDER), rows(np.arange(length)), rows(ORDER), window, PREFIXES
        )
        return {name: weights[:, :, 0] for name, weights in out.items()}

    windows = (None, 2)
    q, k = jnp.zeros(shape), jax.random.normal(jax.random.key(0), shape)
    return dict(zip(windows, jax.jit(lambda q, k: [of(window, q, k) for window in windows])(q, k)))


@pytest.mark.parametrize(
    "window, expected", [(None, [CAUSAL, PREFIX_3, WHOLE]), (2, [CAUSAL_WINDOW_2, PREFIX_3_WINDOW_2, WHOLE_WINDOW_2])]
)
def test_each_query_sees_the_keys_the_prefix_lm_mask_allows(window, expected):
    expected = np.array(expected, np.float32)
    uniform = np.pad(expected / expected.sum(-1, keepdims=True), [(0, 0), (0, 0), (0, 2)])  # head_dim 8 > 6 keys
    assert len(attention_weights()[window]) == (4 if window else 3)
    for name, weights in attention_weights()[window].items():
        np.testing.assert_allclose(weights, uniform, atol=1e-6, err_msg=name)


def test_banded_attention_with_a_bidirectional_prefix_equals_dense_in_values_and_gradients():
    # No prefix, one inside a window, prefixes past the window, the whole sequence and more; 13 = 3 x 4 + 1.
    prefix = jnp.array([0, 2, 5, 9, 13, 20])
    q, k, v = random_qkv(6, 13, 2, 8, seed=3)
    cotangent = jax.random.normal(jax.random.key(7), q.shape)

    @jax.jit
    def values_and_gradients(q, k, v):
        def of(fn):
            out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, window=4, bidirectional=prefix), q, k, v)
            return (out, *pullback(cotangent))

        return of(attn.banded_attention), of(attn.dense_attention)

    banded, dense = values_and_gradients(q, k, v)
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), banded, dense):
        assert relative_error(actual, expected) <= 1e-5, name


# --------------------------------------------------------------------------------------
# ImageToText
# --------------------------------------------------------------------------------------


def test_encode_lays_out_prompt_answer_and_end_and_masks_the_loss_on_the_answer():
    images = IMAGES[:2]
    batch = image_to_text.encode(images, [[5, 6], [7]], [[8, 9, 10], [11]], eos_id=2, length=6, pad_id=3)
    assert batch["image"] is images
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 8, 9, 10, 2, 3], [7, 11, 2, 3, 3, 3, 3]])
    np.testing.assert_array_equal(batch["prompt_lengths"], [2, 1])
    # over tokens[:, 1:]: the predictions of 8, 9, 10, end and of 11, end
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    full = image_to_text.encode(images[:1], [[5, 6]], [[7, 8, 9, 10]], eos_id=2, length=6)
    np.testing.assert_array_equal(full["tokens"], [[5, 6, 7, 8, 9, 10, 2]])
    with pytest.raises(ValueError, match="row 1: an empty prompt"):
        image_to_text.encode(images, [[5], []], [[6], [7]], eos_id=2, length=6)
    with pytest.raises(ValueError, match="row 0 holds 8 tokens"):
        image_to_text.encode(images[:1], [[5, 6]], [[7, 8, 9, 10, 11]], eos_id=2, length=6)


def test_the_captioning_loss_is_the_mean_negative_log_likelihood_of_the_answers_only():
    model, params, _ = captioner()
    tokens, mask = CAPTIONS["tokens"], CAPTIONS["loss_mask"]
    logits = caption_logits(model)(params, CAPTIONS["image"], tokens[:, :-1], CAPTIONS["prompt_lengths"])
    as_float64 = np.asarray(logits, np.float64)
    log_probs = as_float64 - np.log(np.exp(as_float64).sum(-1, keepdims=True))
    rows, positions = np.nonzero(mask)
    targets = tokens[rows, positions + 1]
    compiled = Compiled(model)
    loss, accuracy = image_to_text.loss(compiled, params, CAPTIONS)
    assert float(loss) == pytest.approx(-log_probs[rows, positions, targets].mean(), rel=1e-5)
    assert float(accuracy) == pytest.approx((as_float64[rows, positions].argmax(-1) == targets).mean())

    def loss_with(changes, model=compiled):
        changed = tokens.copy()
        for (row, position), token in changes.items():
            changed[row, position] = token
        return float(image_to_text.loss(model, params, {**CAPTIONS, "tokens": changed})[0])

    # Padding after the end (an input and a target) and the last column (a target only) do not count.
    assert loss_with({(1, 5): 30, (3, 12): 31}) == pytest.approx(float(loss), rel=1e-6)
    assert abs(loss_with({(0, 3): 30}) - float(loss)) > 1e-3  # an answer token does

    class SameLogits:
        """The model's logits for the original inputs, whatever the batch holds: only the targets change."""

        def apply(self, *_):
            return logits

    # Row 2 is 8 9 10 | 18 end: the targets of its first two positions are prompt tokens, not counted.
    assert loss_with({(2, 1): 30, (2, 2): 31}, SameLogits()) == pytest.approx(float(loss), rel=1e-6)
    assert abs(loss_with({(2, 4): 30}, SameLogits()) - float(loss)) > 1e-3  # its end token is counted


def test_the_prompt_attends_both_ways_and_the_answer_causally():
    """Row 2 is [image] 8 9 10 | 18 end: its prompt's first position reads the prompt's last token (it
    could not under a causal mask), and no prompt position reads the answer."""
    model, params, _ = captioner()
    inputs, lengths = CAPTIONS["tokens"][:, :-1], CAPTIONS["prompt_lengths"]
    logits = lambda tokens, lengths=lengths: np.asarray(
        caption_logits(model)(params, CAPTIONS["image"], tokens, lengths)
    )
    base = logits(inputs)
    last_prompt, first_answer = inputs.copy(), inputs.copy()
    last_prompt[2, 2] = 30
    first_answer[2, 3] = 30
    assert np.abs(logits(last_prompt)[2, 0] - base[2, 0]).max() > 1e-3
    answer_changed = logits(first_answer)
    np.testing.assert_allclose(answer_changed[2, :3], base[2, :3], atol=1e-6)
    assert np.abs(answer_changed[2, 3] - base[2, 3]).max() > 1e-3
    # The two-way attention comes from prompt_lengths (the attention mask), not from the loss mask:
    # with an image-only prefix, the prompt is causal.
    no_prompt = np.zeros_like(lengths)
    np.testing.assert_allclose(logits(last_prompt, no_prompt)[2, :2], logits(inputs, no_prompt)[2, :2], atol=1e-6)


@pytest.mark.parametrize("pattern", [("dense",), ("dense", "banded")], ids=["dense", "dense+banded-w4"])
def test_describing_images_equals_recomputing_the_model_at_every_step(pattern):
    """Greedy answers over the KV cache, the image tokens prefilled with prompts of different lengths, are
    the argmax of the whole model rerun on each growing sequence (banded: a window of 4, less than the
    5 image tokens and a prompt)."""
    model, params, _ = captioner(pattern)
    images, prompts, steps = IMAGES[4:], [[3], [4, 5, 6, 7], [8, 9], [10, 11, 12]], 8
    new = np.asarray(image_to_text.describe(model, params, images, prompts, steps))
    sequences, length = [list(prompt) for prompt in prompts], CAPTIONS["tokens"].shape[1] - 1  # 4 + 8 tokens
    prompt_lengths = np.array([len(prompt) for prompt in prompts], np.int32)
    for _ in range(steps):
        padded = np.array([row + [0] * (length - len(row)) for row in sequences], np.int32)
        logits = np.asarray(caption_logits(model)(params, images, padded, prompt_lengths))
        for i, row in enumerate(sequences):
            row.append(int(logits[i, len(row) - 1].argmax()))
    assert new.tolist() == [row[len(prompt) :] for row, prompt in zip(sequences, prompts)]


def test_generate_refuses_a_prefix_that_does_not_fit():
    params = captioner()[1]
    decoder, prompts = GPT(TEXT), [[3], [4, 5]]
    prefix = jnp.zeros((2, IMAGE_TOKENS, TEXT.d_model))
    for wrong in (prefix[:1], prefix[..., :-1], prefix[0]):
        with pytest.raises(ValueError, match="prefix must be"):
            generate(decoder, params["decoder"], prompts, 4, prefix=wrong)
    # 5 + 2 + 18 = 25 positions in a context of 24
    with pytest.raises(ValueError, match="pass context_length=24"):
        generate(decoder, params["decoder"], prompts, 18, prefix=prefix)


def test_the_captioning_loss_is_the_same_on_one_device_and_on_a_mesh():
    model, params, boxed = captioner()
    expected = image_to_text.loss(Compiled(model), params, CAPTIONS)
    actual, _ = on_mesh(functools.partial(image_to_text.loss, model), params, boxed, CAPTIONS, "data=2,fsdp=2,tensor=2")
    np.testing.assert_allclose(np.array(actual), np.array(expected), rtol=1e-5)


# --------------------------------------------------------------------------------------
# Two towers
# --------------------------------------------------------------------------------------


def test_clip_and_sigmoid_losses_match_numpy():
    logits = np.random.default_rng(2).normal(scale=3.0, size=(5, 5))
    log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
    diagonal = np.arange(5)
    image_to_text_term = -log_softmax(logits)[diagonal, diagonal].mean()
    text_to_image_term = -log_softmax(logits.T)[diagonal, diagonal].mean()
    clip = (image_to_text_term + text_to_image_term) / 2
    labels = np.where(np.eye(5) == 1, 1.0, -1.0)
    sigmoid = np.log1p(np.exp(-labels * logits)).sum() / 5
    both = jax.jit(lambda x: (two_tower.clip_loss(x), two_tower.sigmoid_loss(x)))(jnp.asarray(logits, jnp.float32))
    assert tuple(map(float, both)) == pytest.approx((clip, sigmoid), rel=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_the_contrastive_loss_is_the_same_on_eight_devices_which_gather_the_text_embeddings(loss):
    """Data parallel over 8 devices, one pair each: the params are replicated, so the one all-gather in
    the program is an activation's, the [batch, embed_dim] text embeddings every device's similarity
    row needs."""
    model, params, boxed = two_towers(loss)
    fn = functools.partial(two_tower.loss, model)
    expected = jax.jit(fn)(params, PAIRS)
    actual, compiled = on_mesh(fn, params, boxed, PAIRS, "data=8")
    np.testing.assert_allclose(np.array(actual), np.array(expected), rtol=1e-5)
    gathered = re.findall(r"= (\S+) all-gather\(", compiled.as_text())
    assert [shape.split("{")[0] for shape in gathered] == [f"f32[8,{EMBED_DIM}]"]


def test_zero_shot_picks_each_images_most_similar_class_prompt_whatever_the_padding():
    model, params, _ = two_towers("siglip")
    rng = np.random.default_rng(3)
    lengths = np.array([2, 6, 3, 1], np.int32)
    prompts = rng.integers(2, TEXT.vocab_size, (4, 6)).astype(np.int32)
    prompts[np.arange(6) >= lengths[:, None]] = 0
    garbage = np.where(prompts == 0, rng.integers(2, TEXT.vocab_size, prompts.shape), prompts).astype(np.int32)

    @jax.jit  # one program: zero_shot's inlined beside the direct computation
    def classes_and_embeddings(params, images, garbage, prompts, lengths):
        apply = functools.partial(model.apply, {"params": params})
        classes = two_tower.zero_shot(model, params, images, garbage, lengths)
        return (
            classes,
            apply(images, method=TwoTower.embed_images),
            apply(prompts, lengths, method=TwoTower.embed_texts),
        )

    classes, images, texts = classes_and_embeddings(params, IMAGES, garbage, prompts, lengths)
    expected = (np.asarray(images, np.float64) @ np.asarray(texts, np.float64).T).argmax(axis=1)
    assert len(set(expected.tolist())) > 1  # the images do not all pick one class
    np.testing.assert_array_equal(classes, expected)


# --------------------------------------------------------------------------------------
# Configs and pretrained towers
# --------------------------------------------------------------------------------------


def test_dotted_overrides_set_fields_of_nested_configs():
    cfg = ImageToTextConfig(VISION, TEXT)
    new = configs.override(cfg, ["text.num_layers=1", "vision.d_model=32", "text.attention_impl=dense"])
    assert new == ImageToTextConfig(
        dataclasses.replace(VISION, d_model=32), dataclasses.replace(TEXT, num_layers=1, attention_impl="dense")
    )
    pair = configs.override(TwoTowerConfig(VISION, TEXT), ["loss=clip", "embed_dim=8", "text.vocab_size=48"])
    assert (pair.loss, pair.embed_dim, pair.text.vocab_size, pair.vision) == ("clip", 8, 48, VISION)
    with pytest.raises(ValueError, match="no nested config 'audio'"):
        configs.override(cfg, ["audio.num_layers=1"])
    with pytest.raises(ValueError, match="GPTConfig has no field 'num_layerz'; did you mean num_layers"):
        configs.override(cfg, ["text.num_layerz=1"])


def test_towers_from_transformers_weights_give_transformers_outputs(tmp_path):
    torch = pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
    transformers = pytest.importorskip("transformers", reason="the interop extra is not installed")
    from zoo import interop, runs

    torch.manual_seed(0)
    vit_config = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(**vit_config, intermediate_size=32, num_labels=3)
    ).eval()
    gpt2_config = dict(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=24)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2_config, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # every weight perturbed, so that a swapped or transposed tensor shows
        for param in [*vit.parameters(), *gpt2.parameters()]:
            param.add_(0.1 * torch.randn_like(param))
    gpt2.save_pretrained(tmp_path / "gpt2")
    vision, vision_params, _ = interop.from_transformers(vit)
    text, text_params, tokenizer = runs.load_pretrained(tmp_path / "gpt2")
    assert tokenizer is None and text.context_length == 24
    model = ImageToText(ImageToTextConfig(vision, text))
    params = {
        "encoder": {name: value for name, value in vision_params.items() if name != "head"},
        "projection": {"kernel": jnp.eye(16), "bias": jnp.zeros(16)},
        "decoder": text_params,
    }
    images = np.random.default_rng(4).normal(size=(2, 3, 8, 8)).astype(np.float32)
    tokens = np.random.default_rng(5).integers(0, 40, (2, 7))
    with torch.no_grad():
        hf_features = vit.vit(torch.from_numpy(images)).last_hidden_state.numpy()
        hf_logits = gpt2(torch.from_numpy(tokens)).logits.numpy()

    @jax.jit
    def ours(params, images, tokens):
        apply = functools.partial(model.apply, {"params": params})
        return apply(images, method=lambda m, x: m.encoder.features(x)), apply(tokens, method=lambda m, t: m.decoder(t))

    features, logits = ours(params, images.transpose(0, 2, 3, 1), jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(features, hf_features, atol=1e-4)
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4)
