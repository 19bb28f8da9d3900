"""zoo.interop: transformers GPT-2, GPT-1 and ViT weights give our models the same logits."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_env import experiment_module

torch = pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
transformers = pytest.importorskip("transformers", reason="the interop extra (torch, transformers) is not installed")

from zoo import interop  # noqa: E402
from zoo.models.gpt import GPT, GPTConfig  # noqa: E402
from zoo.models.vit import ViT  # noqa: E402
from zoo.tokenizer import train_byte_level_bpe  # noqa: E402

TOLERANCE = 1e-4
TEXTS = ["Hello  world,\n\nit's   GPT-2's tokenizer.", "héllo wörld 🙂", "床前明月光，疑是地上霜。"]
REPO = Path(__file__).resolve().parents[1]

# name: (HF class, HF config class, config kwargs, sequence length); lengths are odd, two fill the context.
GPT_CASES = {
    "gpt2-4heads": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=24),
        13,
    ),
    "gpt2-5heads-inner-gelu": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(
            n_embd=30,
            n_layer=3,
            n_head=5,
            n_inner=52,
            vocab_size=97,
            n_positions=19,
            activation_function="gelu",
            layer_norm_epsilon=1e-6,
        ),
        19,
    ),
    "gpt1-4heads": (
        "OpenAIGPTLMHeadModel",
        "OpenAIGPTConfig",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=24),
        11,
    ),
    "gpt1-3heads": (
        "OpenAIGPTLMHeadModel",
        "OpenAIGPTConfig",
        dict(n_embd=36, n_layer=3, n_head=3, vocab_size=89, n_positions=17, layer_norm_epsilon=1e-6),
        17,
    ),
}
VIT_CASES = {
    "vit-32x48-p8": dict(
        image_size=(32, 48),
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=7,
    ),
    "vit-28-p14-3heads": dict(
        image_size=28,
        patch_size=14,
        num_channels=1,
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=40,
        num_labels=4,
        layer_norm_eps=1e-6,
    ),
}


def build(model_class: str, config_class: str, **kwargs) -> "torch.nn.Module":
    """A random HF model in eval mode; every weight (LN scales and biases too) is perturbed so a
    swapped or transposed tensor cannot go unnoticed."""
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(GPT_CASES), ids=list(GPT_CASES))
def gpt_case(request):
    model_class, config_class, kwargs, length = GPT_CASES[request.param]
    bos_eos = dict(bos_token_id=0, eos_token_id=0) if config_class == "GPT2Config" else {}
    return build(model_class, config_class, **kwargs, **bos_eos), length


@pytest.fixture(scope="module", params=list(VIT_CASES), ids=list(VIT_CASES))
def vit_model(request):
    return build("ViTForImageClassification", "ViTConfig", **VIT_CASES[request.param])


@pytest.fixture(scope="module")
def gpt2_model():
    model_class, config_class, kwargs, _ = GPT_CASES["gpt2-4heads"]
    return build(model_class, config_class, **kwargs, bos_token_id=0, eos_token_id=0)


def numpy_state(hf_model) -> dict:
    return {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


def flat(params: dict) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}


def assert_same_params(actual: dict, expected: dict) -> None:
    assert_same_arrays(flat(actual), flat(expected))


def assert_same_arrays(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def assert_matches_init(model: nn.Module, params: dict, example: jax.Array) -> None:
    """Exactly the tree, shapes and dtype of our own initialisation."""
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), example)["params"])
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert isinstance(got, jax.Array) and got.dtype == jnp.float32 and got.shape == want.shape


def test_gpt_logits_match_transformers(gpt_case):
    hf_model, length = gpt_case
    cfg, params, _ = interop.from_transformers(hf_model)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, length))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens)).logits.numpy()
    actual = jax.jit(GPT(cfg).apply)({"params": params}, jnp.asarray(tokens, jnp.int32))
    assert_matches_init(GPT(cfg), params, jnp.asarray(tokens, jnp.int32))
    assert np.max(np.abs(np.asarray(actual) - expected)) <= TOLERANCE


def test_gpt_config_fields(gpt_case):
    hf_model, _ = gpt_case
    hf = hf_model.config
    cfg, _, _ = interop.from_transformers(hf_model)
    assert (cfg.vocab_size, cfg.context_length, cfg.num_layers, cfg.d_model, cfg.num_heads) == (
        hf.vocab_size,
        hf.n_positions,
        hf.n_layer,
        hf.n_embd,
        hf.n_head,
    )
    assert cfg.d_ff == (getattr(hf, "n_inner", None) or 4 * hf.n_embd)
    assert cfg.layer_norm_eps == hf.layer_norm_epsilon
    gpt1 = hf.model_type == "openai-gpt"
    assert (cfg.norm_position, cfg.final_norm) == (("post", False) if gpt1 else ("pre", True))
    assert cfg.activation == ("gelu" if getattr(hf, "activation_function", None) == "gelu" else "gelu_tanh")


def test_gpt_base_model_gives_the_same_params(gpt_case):
    hf_model, _ = gpt_case
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.get_input_embeddings().weight.data_ptr()
    cfg, params, _ = interop.from_transformers(hf_model)
    base_cfg, base_params, _ = interop.from_transformers(hf_model.transformer)
    assert base_cfg == cfg
    assert_same_params(base_params, params)


def test_vit_logits_match_transformers(vit_model):
    cfg, params, _ = interop.from_transformers(vit_model)
    images = np.random.default_rng(2).normal(size=(2, cfg.num_channels, *cfg.image_size)).astype(np.float32)
    with torch.no_grad():
        expected = vit_model(torch.from_numpy(images)).logits.numpy()
    ours = jnp.asarray(images.transpose(0, 2, 3, 1))
    actual = jax.jit(ViT(cfg).apply)({"params": params}, ours)
    assert_matches_init(ViT(cfg), params, ours)
    assert actual.shape == (2, vit_model.config.num_labels)
    assert np.max(np.abs(np.asarray(actual) - expected)) <= TOLERANCE


def test_vit_config_fields(vit_model):
    hf = vit_model.config
    cfg, _, _ = interop.from_transformers(vit_model)
    square = (hf.image_size, hf.image_size) if isinstance(hf.image_size, int) else tuple(hf.image_size)
    assert (cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.num_classes) == (
        square,
        hf.patch_size,
        hf.num_channels,
        hf.num_labels,
    )
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.layer_norm_eps, cfg.pooling) == (
        hf.num_hidden_layers,
        hf.hidden_size,
        hf.num_attention_heads,
        hf.intermediate_size,
        hf.layer_norm_eps,
        "token",
    )


def test_tied_lm_head_may_be_absent(gpt2_model):
    state = numpy_state(gpt2_model)
    config = gpt2_model.config.to_dict()
    without_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
    unprefixed = {k.removeprefix("transformer."): v for k, v in without_head.items()}
    _, expected = interop.from_state_dict("gpt2", config, state)
    for variant in (without_head, unprefixed):
        assert_same_params(interop.from_state_dict("gpt2", config, variant)[1], expected)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, gpt2_model):
    """save_pretrained directories: name -> (directory, the model route's (config, params))."""
    root = tmp_path_factory.mktemp("saved")
    models = {
        "gpt2": gpt2_model,
        "gpt1": build("OpenAIGPTLMHeadModel", "OpenAIGPTConfig", **GPT_CASES["gpt1-3heads"][2]),
        "vit": build("ViTForImageClassification", "ViTConfig", **VIT_CASES["vit-32x48-p8"]),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = (root / name, interop.from_transformers(model))
    trained = train_byte_level_bpe(TEXTS * 20, root / "bpe" / "tokenizer.json", 300)
    transformers.GPT2TokenizerFast(tokenizer_file=str(root / "bpe" / trained.FILE_NAME)).save_pretrained(root / "gpt2")
    gpt2_model.save_pretrained(root / "gpt2-sharded", max_shard_size="20KB")
    assert (root / "gpt2-sharded" / "model.safetensors.index.json").is_file()
    out["gpt2-sharded"] = (root / "gpt2-sharded", out["gpt2"][1])
    return out


def test_directory_route_equals_model_route(saved):
    for name, (directory, (cfg, params, _)) in saved.items():
        dir_cfg, dir_params, _ = interop.from_transformers(directory)
        assert dir_cfg == cfg, name
        assert_same_params(dir_params, params)
    assert interop.from_transformers(str(saved["vit"][0]))[0] == saved["vit"][1][0]


def test_a_gpt2_directory_gives_its_tokenizer_as_transformers_reads_it(saved):
    directory = saved["gpt2"][0]
    tokenizer = interop.from_transformers(directory).tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_id == reference.convert_tokens_to_ids("<|endoftext|>")


def test_no_tokenizer_without_a_gpt2_directory_holding_one(saved):
    for name in ("gpt2-sharded", "gpt1", "vit"):
        assert interop.from_transformers(saved[name][0]).tokenizer is None, name
    assert saved["gpt2"][1].tokenizer is None  # a model object carries no tokenizer


def test_generate_script_continues_a_gpt2_folder_as_transformers_does(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    tokenizer = train_byte_level_bpe(TEXTS * 20, tmp_path / "tokenizer.json", 300)
    transformers.GPT2TokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json")).save_pretrained(folder)
    model = build("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=32)
    model.save_pretrained(folder)
    prompt = "Hello  world"
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_id
        )
    flags = ["--from-transformers", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8"]
    experiment_module("generate").main(flags)
    assert capsys.readouterr().out == f"--- 1 (step 0) ---\n{tokenizer.decode(expected[0].tolist())}\n"


def test_directory_route_needs_no_torch(saved, tmp_path):
    """In a fresh interpreter where importing torch or transformers fails, the directory route
    still gives exactly the model route's config and params."""
    script = textwrap.dedent(
        """
        import dataclasses, json, sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        import jax
        import numpy as np
        from zoo import interop

        out = {}
        for name, directory in json.loads(sys.argv[1]).items():
            cfg, params, _ = interop.from_transformers(directory)
            leaves = jax.tree_util.tree_leaves_with_path(params)
            np.savez(sys.argv[2] + f"/{name}.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
            out[name] = dataclasses.asdict(cfg)
        print(json.dumps(out))
        """
    )
    directories = json.dumps({name: str(directory) for name, (directory, _) in saved.items()})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script, directories, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    configs = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (_, (cfg, params, _)) in saved.items():
        expected_cfg = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples become lists, as in the child
        assert configs[name] == expected_cfg, name
        with np.load(tmp_path / f"{name}.npz") as loaded:
            assert_same_arrays({k: loaded[k] for k in loaded.files}, flat(params))


UNSUPPORTED = [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
    ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ("gpt2", {"architectures": ["GPT2ForSequenceClassification"]}, "GPT2ForSequenceClassification"),
    ("openai-gpt", {"afn": "relu"}, "afn='relu'"),
    ("vit", {"qkv_bias": False}, "qkv_bias"),
    ("vit", {"hidden_act": "relu"}, "hidden_act='relu'"),
    ("vit", {"patch_size": [8, 4]}, "patch_size"),
    ("vit", {"id2label": {}}, "num_labels"),
    ("vit", {"architectures": ["ViTModel"]}, "ViTModel"),
    ("bert", {}, "model_type='bert'"),
]


@pytest.mark.parametrize("model_type, hf_config, message", UNSUPPORTED, ids=[m for _, _, m in UNSUPPORTED])
def test_unsupported_config_raises(model_type, hf_config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        interop.from_state_dict(model_type, hf_config, {})


def test_bad_checkpoints_raise(gpt2_model):
    state, config = numpy_state(gpt2_model), gpt2_model.config.to_dict()
    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias"):
        interop.from_state_dict("gpt2", config, missing)
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    with pytest.raises(ValueError, match=r"lm_head\.weight differs"):
        interop.from_state_dict("gpt2", config, untied)
    with pytest.raises(ValueError, match="shapes do not match"):
        interop.from_state_dict("gpt2", {**config, "vocab_size": config["vocab_size"] + 1}, state)


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(TypeError, match="transformers model or a checkpoint directory"):
        interop.from_transformers(GPTConfig())
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        interop.from_transformers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        interop.from_transformers(tmp_path)
