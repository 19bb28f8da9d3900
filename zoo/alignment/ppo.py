"""PPO against a learned (or computed) reward with a per-token KL penalty to the SFT policy, and
PPO-ptx's pretraining term (InstructGPT, Ouyang et al. 2022, section 3.5):

    objective = E[r(x, y) - β · log(π(y|x) / π_SFT(y|x))] + γ · E_pretrain[log π(x)]

One train step of the shared loop is one PPO iteration, compiled whole:
1. rollout: the policy samples a response to each prompt of the batch (`generate_padded`, up to
   the end token);
2. scoring: the reward model's score at the response's last token (or, in the sanity mode, the
   true rule score from the host), the policy's, the SFT reference's and the value model's
   per-token log-probabilities and values;
3. rewards: -β · KL per token, with the score added at the last token; KL by the k1 estimator,
   log π(a) - log π_SFT(a) of the sampled token (unbiased, as InstructGPT's penalty);
4. GAE (γ, λ) by a reverse scan; advantages whitened over the batch's response tokens;
5. `epochs` passes over `minibatches` shuffled minibatches: the clipped policy loss, the clipped
   value loss and γ_ptx times the next-token loss on the batch's pretraining rows, one optimizer
   update each.

The policy (a GPT) and the value model (a `RewardModel`, read at every position) train; the SFT
reference and the reward model are the loop's constants. All four use the one rules table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.alignment.reward import RewardModel
from zoo.generation import generate_padded
from zoo.models.gpt import GPT
from zoo.train.steps import learning_rate, next_token_loss

REWARDS = ("model", "rule")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO's settings; defaults sized for the small models here."""

    kl_coef: float = 0.05  # β: the per-token KL penalty to the SFT policy
    ptx_coef: float = 0.0  # γ: the pretraining log-likelihood's weight (> 0: PPO-ptx)
    clip: float = 0.2  # ε of the policy ratio
    value_clip: float = 0.2  # how far a value may move from its rollout's
    gamma: float = 1.0  # GAE's discount
    lam: float = 0.95  # GAE's λ
    epochs: int = 2  # passes over each rollout
    minibatches: int = 2  # updates per pass
    response_tokens: int = 24  # the longest response
    temperature: float = 1.0  # of the rollouts' sampling
    reward: str = "model"  # "model": the reward model's score; "rule": the true score (sanity runs)

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"reward={self.reward!r}; choose one of {REWARDS}")
        if min(self.epochs, self.minibatches, self.response_tokens) < 1:
            raise ValueError("epochs, minibatches and response_tokens must be >= 1")


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """An estimate of KL(π || π_ref) from the log-probabilities of tokens sampled from π: "k1",
    log π(a) - log π_ref(a) (unbiased, can be negative), or "k3", (ρ - 1) - log ρ with
    ρ = π_ref(a) / π(a) (unbiased, never negative)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator={estimator!r}; choose k1 or k3")


def shaped_rewards(score: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float) -> jax.Array:
    """Per-token rewards [B, R]: -β · KL at every response token, plus `score` [B] at the last one
    (where `mask` [B, R], 1 up to the response's end, turns 0)."""
    last = jnp.sum(mask, axis=1).astype(jnp.int32) - 1
    bonus = jax.nn.one_hot(last, mask.shape[1], dtype=kl.dtype) * score[:, None]
    return (bonus - kl_coef * kl) * mask


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, R] by generalised advantage estimation, a reverse scan over the
    response: δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γ λ A_{t+1}; the value after the last
    token is 0 (the episode ends there) and masked positions carry nothing back."""
    values = values * mask
    following = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
    deltas = (rewards + gamma * following - values) * mask

    def back(later: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        advantage = delta + gamma * lam * later
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0], rewards.dtype), deltas.T, reverse=True)
    advantages = advantages.T * mask
    return advantages, advantages + values


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1)


def whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
    """`x` scaled to mean 0 and variance 1 over the masked positions."""
    mean = masked_mean(x, mask)
    return (x - mean) * jax.lax.rsqrt(masked_mean((x - mean) ** 2, mask) + 1e-8) * mask


def policy_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, clip: float
) -> tuple[jax.Array, jax.Array]:
    """(PPO's clipped surrogate loss, the fraction of tokens whose ratio is clipped):
    -mean(min(ρ A, clip(ρ, 1 - ε, 1 + ε) A)) with ρ = π(a) / π_old(a)."""
    ratio = jnp.exp(logp - old_logp)
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - clip, 1 + clip) * advantages)
    return -masked_mean(surrogate, mask), masked_mean((jnp.abs(ratio - 1) > clip).astype(ratio.dtype), mask)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, clip: float) -> jax.Array:
    """The clipped value loss: 0.5 · mean(max((V - G)², (V_old + clip(V - V_old, ±ε) - G)²))."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def objective(policy: jax.Array, value: jax.Array, ptx: jax.Array, ptx_coef: float) -> jax.Array:
    """What one update minimises: the policy and value losses and, for PPO-ptx, γ times the
    pretraining rows' next-token loss (maximising their log-likelihood)."""
    return policy + value + ptx_coef * ptx


def response_mask(response: jax.Array, stop_token: int) -> jax.Array:
    """1 on a response's tokens up to and including its first stop token, 0 after it [B, R]."""
    stops = (response == stop_token).astype(jnp.int32)
    return ((jnp.cumsum(stops, axis=1) - stops) == 0).astype(jnp.float32)


def with_response(prompt: jax.Array, lengths: jax.Array, response: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sequences [B, P + R]: each prompt's real tokens, then its response; the positions [B, R]
    whose outputs predict the response's tokens)."""
    batch, width = prompt.shape
    at = lengths[:, None] + jnp.arange(response.shape[1])
    sequence = jnp.zeros((batch, width + response.shape[1]), jnp.int32).at[:, :width].set(prompt)
    sequence = sequence.at[jnp.arange(batch)[:, None], at].set(response)
    return sequence, at - 1


def token_logprobs(policy: GPT, params: Any, sequence: jax.Array, positions: jax.Array, tokens: jax.Array) -> jax.Array:
    """log π(tokens | what precedes them) [B, R]: the logits at `positions` only."""
    hidden = policy.apply({"params": params}, sequence, method=GPT.hidden_states)
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = policy.apply({"params": params}, hidden, method=GPT.logits)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]


def values_at(critic: RewardModel, params: Any, sequence: jax.Array, positions: jax.Array) -> jax.Array:
    """The value model's estimates [B, R] at `positions`."""
    return jnp.take_along_axis(critic.apply({"params": params}, sequence), positions, axis=1)


def train_step(
    policy: GPT,
    critic: RewardModel,
    config: PPOConfig,
    stop_token: int,
    true_score: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> Callable[[optax.GradientTransformation], Callable]:
    """The loop's `Task.train_step`: optimizer -> `(state, batch, constants) -> (state, metrics)`,
    one PPO iteration. state["params"] = {"policy", "value"}; constants = {"reference": the SFT
    policy's params, "reward": the reward model's (unused by the rule reward)}; batch = {"prompt"
    int32 [B, P] right-padded, "length" [B], "instruction" [B] (what `true_score` scores by),
    "ptx" [B, T + 1] pretraining rows}. `true_score(instruction, response)`, host code run by a
    callback, gives each response's true score (reported; the reward in the "rule" mode)."""
    if config.reward == "rule" and true_score is None:
        raise ValueError('the "rule" reward needs true_score')

    def rollout(params: Any, constants: Any, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        """The responses to the batch's prompts and what the updates need of them (no gradients)."""
        response = generate_padded(
            policy,
            params["policy"],
            batch["prompt"],
            batch["length"],
            config.response_tokens,
            key,
            temperature=config.temperature,
            stop_tokens=(stop_token,),
        )
        mask = response_mask(response, stop_token)
        sequence, positions = with_response(batch["prompt"], batch["length"], response)
        logp = token_logprobs(policy, params["policy"], sequence, positions, response)
        ref_logp = token_logprobs(policy, constants["reference"], sequence, positions, response)
        values = values_at(critic, params["value"], sequence, positions)
        last = batch["length"] + jnp.sum(mask, axis=1).astype(jnp.int32) - 1
        metrics = {}
        if true_score is not None:
            shape = jax.ShapeDtypeStruct(last.shape, jnp.float32)
            metrics["true_score"] = jax.pure_callback(true_score, shape, batch["instruction"], response)
        if config.reward == "model":
            metrics["reward_model_score"] = values_at(critic, constants["reward"], sequence, last[:, None])[:, 0]
        score = metrics["reward_model_score" if config.reward == "model" else "true_score"]
        kl = kl_per_token(logp, ref_logp) * mask
        advantages, returns = gae(
            shaped_rewards(score, kl, mask, config.kl_coef), values, mask, config.gamma, config.lam
        )
        experience = {
            "sequence": sequence,
            "positions": positions,
            "response": response,
            "mask": mask,
            "old_logp": logp,
            "old_values": values,
            "advantages": whiten(advantages, mask),
            "returns": returns,
            "ptx": batch["ptx"],
        }
        metrics |= {"kl": jnp.mean(jnp.sum(kl, axis=1)), "response_tokens": jnp.mean(jnp.sum(mask, axis=1))}
        return experience, metrics  # constants of the updates: their gradients are taken inside `losses`

    def losses(params: Any, minibatch: dict) -> tuple[jax.Array, dict]:
        mb = minibatch
        logp = token_logprobs(policy, params["policy"], mb["sequence"], mb["positions"], mb["response"])
        policy_part, clipped = policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], config.clip)
        values = values_at(critic, params["value"], mb["sequence"], mb["positions"])
        value_part = value_loss(values, mb["old_values"], mb["returns"], mb["mask"], config.value_clip)
        ptx = next_token_loss(policy, params["policy"], mb["ptx"]) if config.ptx_coef > 0 else jnp.zeros(())
        total = objective(policy_part, value_part, ptx, config.ptx_coef)
        metrics = {"policy_loss": policy_part, "value_loss": value_part, "clip_fraction": clipped}
        return total, metrics | ({"ptx_loss": ptx} if config.ptx_coef > 0 else {})

    def build(optimizer: optax.GradientTransformation) -> Callable:
        def update(carry: tuple, minibatch: dict) -> tuple[tuple, dict]:
            params, opt_state = carry
            (total, metrics), grads = jax.value_and_grad(losses, has_aux=True)(params, minibatch)
            grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(total), g, jnp.nan), grads)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            metrics |= {"loss": total, "grad_norm": optax.tree.norm(grads)}
            return (optax.apply_updates(params, updates), opt_state), metrics

        def epoch(carry: tuple, key: jax.Array, experience: dict) -> tuple[tuple, dict]:
            rows = jax.tree.leaves(experience)[0].shape[0]
            order = jax.random.permutation(key, rows).reshape(config.minibatches, -1)
            minibatches = jax.tree.map(lambda x: x[order], experience)
            return jax.lax.scan(update, carry, minibatches)

        def step(state: dict, batch: dict, constants: Any) -> tuple[dict, dict]:
            rows = batch["prompt"].shape[0]
            if rows % config.minibatches:
                raise ValueError(f"a batch of {rows} prompts does not split into {config.minibatches} minibatches")
            rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            rollout_key, shuffle_key = jax.random.split(rng)
            experience, metrics = rollout(state["params"], constants, batch, rollout_key)
            keys = jax.random.split(shuffle_key, config.epochs)
            (params, opt_state), updates = jax.lax.scan(
                lambda carry, key: epoch(carry, key, experience), (state["params"], state["opt_state"]), keys
            )
            metrics |= jax.tree.map(jnp.mean, updates) | {"lr": learning_rate(opt_state)}
            return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

        return step

    return build
