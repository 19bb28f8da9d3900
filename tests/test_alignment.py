"""InstructGPT's objectives against hand computations: the chat format's loss mask, the reward
model's pairwise loss and accuracy, the KL estimators, GAE on a short trajectory, PPO's clipped
policy and value losses inside and outside the clip, and the pretraining mix; then one PPO
iteration through the shared loop on a sharded mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_finetune import Letters

from zoo import sharding, tasks
from zoo.alignment import chat, ppo, reward
from zoo.models.gpt import GPT, GPTConfig
from zoo.train import next_token_loss, recipes
from zoo.train.loop import LoopConfig, train

CFG = GPTConfig(vocab_size=28, context_length=24, num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout=0.0)


@pytest.fixture(scope="module")
def chat_model():
    params = nn.unbox(GPT(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    cfg, params, tokenizer = chat.add_chat_tokens(CFG, params, Letters(), jax.random.key(1), multiple_of=8)
    return cfg, params, tokenizer


def test_chat_tokens_follow_the_vocabulary(chat_model):
    cfg, _, tokenizer = chat_model
    assert cfg.vocab_size == 32  # 28 + 4, a multiple of 8
    assert (tokenizer.system, tokenizer.user, tokenizer.assistant, tokenizer.end) == (28, 29, 30, 31)
    assert chat.special_tokens(tokenizer) == {"first": 28, "names": ["system", "user", "assistant", "end"]}


def test_only_the_assistant_tokens_are_learned(chat_model):
    *_, t = chat_model
    messages = [("system", "b"), ("user", "hi"), ("assistant", "yo"), ("user", "c"), ("assistant", "d")]
    tokens, mask = chat.render(messages, t)
    system, user, assistant, end = t.system, t.user, t.assistant, t.end
    assert tokens == [system, 2, end, user, 8, 9, end, assistant, 25, 15, end, user, 3, end, assistant, 4, end]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert chat.prompt(messages[:2], t) == [*tokens[:7], t.assistant]
    assert t.decode(tokens[:3]) == "<|system|>b<|end|>"
    with pytest.raises(ValueError, match="role"):
        chat.render([("narrator", "x")], t)


def test_the_chat_loss_averages_over_the_assistant_tokens(chat_model):
    cfg, params, t = chat_model
    conversations = [[("user", "ab"), ("assistant", "c")], [("user", "a"), ("assistant", "bcd")]]
    batch, cut = chat.encode(conversations, t, length=10)
    assert cut == 0 and batch["tokens"].shape == (2, 11) and batch["mask"].sum() == 2 + 4
    model = GPT(cfg)
    logits = np.asarray(model.apply({"params": params}, batch["tokens"][:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = [-logp[n, i - 1, batch["tokens"][n, i]] for n in range(2) for i in range(11) if batch["mask"][n, i] == 1]
    assert float(chat.loss(model, params, batch)) == pytest.approx(np.mean(terms), rel=1e-5)
    long, cut = chat.encode([[("user", "abcdefghij"), ("assistant", "k")]], t, length=8)
    assert cut == 1 and long["tokens"][0, 0] == t.user  # the start is kept


def test_pairwise_loss_and_accuracy_by_hand():
    rewards = jnp.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    truth = jnp.array([[0.5, 0.2, 0.5], [0.9, 0.1, 0.4]])
    # prompt 0: 0 > 1 and 2 > 1 (0 and 2 tie: no pair); prompt 1: 0 > 1, 0 > 2, 2 > 1
    margins = [1.0 - 0.0, 2.0 - 0.0, 0.0 - 3.0, 0.0 - 1.0, 1.0 - 3.0]
    loss, accuracy = reward.pairwise_loss(rewards, truth)
    assert float(loss) == pytest.approx(np.mean([np.log1p(np.exp(-m)) for m in margins]), rel=1e-6)
    assert float(accuracy) == pytest.approx(2 / 5)


def test_the_reward_is_read_at_each_responses_last_token(chat_model):
    cfg, *_ = chat_model
    batch = reward.encode([[5, 6], [7]], [[[1, 2], [3]], [[4, 4, 4], [2]]], [[1, 0], [0, 1]], length=5)
    np.testing.assert_array_equal(batch["tokens"][0], [[5, 6, 1, 2, 0], [5, 6, 3, 0, 0]])
    np.testing.assert_array_equal(batch["last"], [[3, 2], [3, 1]])
    model = reward.RewardModel(cfg)
    params = nn.unbox(model.init(jax.random.key(2), jnp.zeros((1, 5), jnp.int32))["params"])
    per_position = model.apply({"params": params}, batch["tokens"].reshape(4, 5))
    expected = per_position[np.arange(4), batch["last"].reshape(4)].reshape(2, 2)
    np.testing.assert_allclose(reward.scores_at(model, params, batch["tokens"], batch["last"]), expected)
    loss, accuracy = reward.loss(model, params, batch)
    assert (float(loss), float(accuracy)) == pytest.approx(
        tuple(map(float, reward.pairwise_loss(expected, batch["score"])))
    )
    with pytest.raises(ValueError, match="same number K"):
        reward.encode([[5]], [[[1], [2]], [[3]]], [[0, 1], [1]], length=5)


def test_kl_estimators_average_to_the_true_kl():
    p = jax.nn.log_softmax(jnp.array([1.0, 0.2, -0.5, 2.0]))
    q = jax.nn.log_softmax(jnp.array([0.1, 0.3, 0.0, 1.0]))
    true_kl = float(jnp.sum(jnp.exp(p) * (p - q)))
    for estimator in ("k1", "k3"):  # the expectation over tokens sampled from p
        per_token = ppo.kl_per_token(p, q, estimator)
        assert float(jnp.sum(jnp.exp(p) * per_token)) == pytest.approx(true_kl, rel=1e-5)
    assert float(ppo.kl_per_token(p, q, "k1")[1]) == pytest.approx(float(p[1] - q[1]))
    assert float(ppo.kl_per_token(p, q, "k1")[1]) < 0 <= float(jnp.min(ppo.kl_per_token(p, q, "k3")))


def test_the_score_comes_at_the_last_token_and_kl_is_paid_at_every_token():
    kl = jnp.array([[0.1, 0.2, 0.3, 0.4]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    rewards = ppo.shaped_rewards(jnp.array([2.0]), kl, mask, kl_coef=0.5)
    np.testing.assert_allclose(rewards, [[-0.05, -0.1, 2.0 - 0.15, 0.0]], rtol=1e-6)


def test_gae_on_a_short_trajectory():
    rewards = jnp.array([[0.0, 0.0, 1.0, 5.0]])
    values = jnp.array([[0.5, 0.6, 0.7, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the response ends at token 2
    gamma, lam = 0.9, 0.8
    d2 = 1.0 + 0.0 - 0.7  # the value after the last token is 0
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, [[a0, a1, a2, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]], rtol=1e-6)


def test_the_clipped_policy_loss_inside_and_outside_the_clip():
    ratios = jnp.array([[1.1, 1.5, 0.5, 0.5, 3.0]])
    advantages = jnp.array([[1.0, 1.0, -1.0, 1.0, 1.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old = jnp.zeros_like(ratios)
    loss, clipped = ppo.policy_loss(jnp.log(ratios), old, advantages, mask, clip=0.2)
    # inside: 1.1; above 1 + ε with A > 0: 1.2; below 1 - ε with A < 0: -0.8; below with A > 0: 0.5
    assert float(loss) == pytest.approx(-(1.1 + 1.2 - 0.8 + 0.5) / 4, rel=1e-6)
    assert float(clipped) == pytest.approx(3 / 4)


def test_the_clipped_value_loss():
    values, old, returns = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, 0.5]]), jnp.array([[1.0, 0.0]])
    loss = ppo.value_loss(values, old, returns, jnp.ones((1, 2)), clip=0.2)
    # token 0: max(0, (0.7 - 1)²) = 0.09; token 1: max((2 - 0)², (0.7 - 0)²) = 4
    assert float(loss) == pytest.approx(0.5 * (0.09 + 4.0) / 2, rel=1e-6)


def test_ptx_adds_gamma_times_the_pretraining_loss():
    assert float(ppo.objective(jnp.array(0.3), jnp.array(0.2), jnp.array(4.0), 0.25)) == pytest.approx(1.5)


def test_responses_are_placed_after_each_prompt_and_masked_after_their_end():
    prompt = jnp.array([[5, 6, 7], [8, 0, 0]])
    response = jnp.array([[1, 9, 9], [2, 3, 9]])  # 9 ends a response; generate repeats it after
    sequence, positions = ppo.with_response(prompt, jnp.array([3, 1]), response)
    np.testing.assert_array_equal(sequence, [[5, 6, 7, 1, 9, 9], [8, 2, 3, 9, 0, 0]])
    np.testing.assert_array_equal(positions, [[2, 3, 4], [0, 1, 2]])
    np.testing.assert_array_equal(ppo.response_mask(response, 9), [[1, 1, 0], [1, 1, 1]])


def test_fine_tuning_and_the_reward_model_train_on_a_sharded_mesh(chat_model, tmp_path):
    cfg, _, t = chat_model
    mesh = sharding.mesh_for("data=2,fsdp=2,tensor=2")
    conversations = [[("user", "ab" * (n % 3 + 1)), ("assistant", "cd"[: n % 2 + 1])] for n in range(8)]
    batch, _ = chat.encode(conversations, t, length=12)
    prompt, replies = [t.user, 1, t.end, t.assistant], [[2, t.end], [3, 3, t.end]]
    comparisons = reward.encode([prompt] * 4, [replies] * 4, [[1, 0]] * 4, length=8)
    optimizer = recipes.optimizer(recipes.Recipe(1e-3, 0, 2, 0.1, 0.0, (0.9, 0.95), 1e-8, 1.0))
    loop = LoopConfig(steps=1, log_every=1, progress=False)
    model = reward.RewardModel(cfg)
    stages = {
        "sft": tasks.supervised_chat(GPT(cfg), batch, batch, 8, 0, eval_batches=0),
        "rm": tasks.reward_model(model, comparisons, comparisons, 4, 0, eval_batches=0),
    }
    for name, task in stages.items():
        summary = train(task, optimizer, mesh, tmp_path / name, loop, {})
        assert np.isfinite(summary["loss"]), name
    assert 0 <= summary["accuracy"] <= 1  # the reward model's pairwise accuracy


def count_of_a(instruction: np.ndarray, response: np.ndarray) -> np.ndarray:
    """The toy rule: the share of a response's letters that are "a" (id 1), up to its end (31)."""
    scores = []
    for row in np.asarray(response).tolist():
        row = row[: row.index(31)] if 31 in row else row
        scores.append(sum(t == 1 for t in row) / max(len(row), 1))
    return np.asarray(scores, np.float32)


def test_one_ppo_ptx_iteration_through_the_loop_on_a_sharded_mesh(chat_model, tmp_path):
    cfg, sft, t = chat_model
    mesh = sharding.mesh_for("data=2,fsdp=2,tensor=2")
    policy = GPT(cfg)
    rng = np.random.default_rng(0)
    prompts = {
        "prompt": rng.integers(1, 27, (8, 6)).astype(np.int32),
        "length": rng.integers(2, 7, 8).astype(np.int32),
        "instruction": np.arange(8, dtype=np.int32),
    }
    rows = rng.integers(1, 27, (16, cfg.context_length + 1)).astype(np.int32)
    reference = jax.device_put(sft, sharding.logical_shardings(policy_shapes(policy), mesh))
    config = ppo.PPOConfig(ptx_coef=0.5, response_tokens=6, epochs=1, minibatches=1, reward="rule")

    def start(fresh):
        return {"policy": sft, "value": {**fresh["value"], "gpt": sft}}

    task = tasks.proximal_policy(
        policy, config, prompts, rows, rows, 8, 0, {"reference": reference}, start, t.end, count_of_a, 1
    )
    optimizer = recipes.optimizer(recipes.Recipe(1e-3, 0, 2, 0.1, 0.0, (0.9, 0.95), 1e-8, 1.0))
    summary = train(task, optimizer, mesh, tmp_path, LoopConfig(steps=1, log_every=1, progress=False), {})
    assert 0 <= summary["true_score"] <= 1 and summary["kl"] == pytest.approx(0, abs=1e-5)  # π = π_SFT at first
    assert abs(summary["policy_loss"]) < 1e-5  # ratio 1 and whitened advantages: zero mean
    params = summary["state"]["params"]
    assert not np.allclose(params["policy"]["pos_embed"], sft["pos_embed"])
    np.testing.assert_array_equal(task.constants["reference"]["pos_embed"], sft["pos_embed"])  # frozen
    # the one update's loss: the policy's (0), the value's and γ times the rows' next-token loss
    ptx = float(next_token_loss(policy, sft, jnp.asarray(task.train_batch(0)["ptx"])))
    assert summary["ptx_loss"] == pytest.approx(ptx, rel=1e-3)
    assert summary["loss"] == pytest.approx(summary["value_loss"] + 0.5 * ptx, rel=1e-3)


def policy_shapes(policy):
    return jax.eval_shape(lambda: policy.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
