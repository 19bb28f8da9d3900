"""Scoring a language model as EleutherAI's lm-evaluation-harness does: the log-likelihood of a
continuation given a context, multiple choice by summed (`acc`) and per-character (`acc_norm`)
log-likelihood, greedy generation cut at stop strings, and perplexity per token and per byte.

    scores = loglikelihood(model, params, tokenizer, [("The cat sat on the", " mat")])  # [(logp, greedy)]

Requests are sorted by length and scored in batches of `batch_size` rows padded to a power-of-two
bucket (from 8 up to the context length), so each bucket compiles once and short requests share a
forward pass. Under a mesh (`sharding.sharding_context`) the batch shards by the logical rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo.generation import generate
from zoo.models.gpt import GPT
from zoo.tokenizer import TextTokenizer

MIN_BUCKET = 8
Tokens = list[int]


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """A question: its context, the candidate continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    answer: int


def split_request(tokenizer: TextTokenizer, context: str, continuation: str) -> tuple[Tokens, Tokens]:
    """(context ids, continuation ids) as the harness makes them: the context's trailing spaces move
    to the continuation, the whole string is encoded and split at the encoded context's length (so
    a merge across the boundary counts for the continuation); an empty context is the end-of-text token."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    cut = len(tokenizer.encode(context))
    return whole[:cut], whole[cut:]


def loglikelihood(
    model: GPT, params: Any, tokenizer: TextTokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16
) -> list[tuple[float, bool]]:
    """For each (context, continuation), in order: the summed natural-log probability of the
    continuation's tokens, and whether each of them was the model's greedy choice."""
    return score_tokens(model, params, [split_request(tokenizer, *r) for r in requests], batch_size=batch_size)


def score_tokens(
    model: GPT, params: Any, requests: Sequence[tuple[Tokens, Tokens]], *, batch_size: int = 16
) -> list[tuple[float, bool]]:
    """`loglikelihood` over token ids: each continuation is scored after its context's last
    tokens, as many as fit the context length."""
    length = model.cfg.context_length
    for context, continuation in requests:
        if not continuation:
            raise ValueError(f"an empty continuation has nothing to score (context ends {context[-5:]})")
        if len(continuation) > length:
            raise ValueError(f"a continuation of {len(continuation)} tokens is longer than the context ({length})")
        if not context:
            raise ValueError(
                "a context needs at least one token (the harness gives an empty one the end-of-text token)"
            )
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for first in range(0, len(order), batch_size):
        chosen = order[first : first + batch_size]
        rows = [(context + continuation)[-(length + 1) :] for context, continuation in (requests[i] for i in chosen)]
        bucket = min(max(MIN_BUCKET, 1 << (max(map(len, rows)) - 2).bit_length()), length)
        inputs = np.zeros((batch_size, bucket), np.int32)
        targets = np.zeros((batch_size, bucket), np.int32)
        for r, row in enumerate(rows):
            inputs[r, : len(row) - 1], targets[r, : len(row) - 1] = row[:-1], row[1:]
        logprobs, greedy = jax.device_get(_token_scores(model, params, jnp.asarray(inputs), jnp.asarray(targets)))
        for r, (i, row) in enumerate(zip(chosen, rows)):
            span = slice(len(row) - 1 - len(requests[i][1]), len(row) - 1)
            results[i] = (float(logprobs[r, span].sum()), bool(greedy[r, span].all()))
    return results


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(model: GPT, params: Any, inputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each target's log-probability [B, L] and whether it is the argmax [B, L]."""
    logits = model.apply({"params": params}, inputs)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return logprobs, jnp.argmax(logits, axis=-1) == targets


def choice_scores(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc's pick, acc_norm's pick): the choice of highest summed log-likelihood, and of highest
    log-likelihood per character of the choice's text (which stops long choices losing by length)."""
    per_char = [ll / max(len(choice), 1) for ll, choice in zip(loglikelihoods, choices)]
    return int(np.argmax(loglikelihoods)), int(np.argmax(per_char))


def multiple_choice(
    model: GPT, params: Any, tokenizer: TextTokenizer, questions: Sequence[MultipleChoice], *, batch_size: int = 16
) -> dict[str, float]:
    """`acc` and `acc_norm` over the questions, every (context, choice) pair scored in one batched pass."""
    requests = [(q.context, choice) for q in questions for choice in q.choices]
    scores = iter(loglikelihood(model, params, tokenizer, requests, batch_size=batch_size))
    picks = [choice_scores([next(scores)[0] for _ in q.choices], q.choices) for q in questions]
    return {
        "acc": float(np.mean([acc == q.answer for (acc, _), q in zip(picks, questions)])),
        "acc_norm": float(np.mean([norm == q.answer for (_, norm), q in zip(picks, questions)])),
    }


def generate_until(
    model: GPT,
    params: Any,
    tokenizer: TextTokenizer,
    contexts: Sequence[str],
    until: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
) -> list[str]:
    """The greedy continuation of each context, cut before the first of the `until` strings (or at
    the end-of-text token)."""
    out = []
    for first in range(0, len(contexts), batch_size):
        batch = [tokenizer.encode(text) or [tokenizer.eos_id] for text in contexts[first : first + batch_size]]
        batch += [batch[-1]] * (batch_size - len(batch))  # a fixed batch: one compilation per bucket
        new = jax.device_get(generate(model, params, batch, max_new_tokens, stop_tokens=(tokenizer.eos_id,)))
        out += [cut_at(tokenizer.decode(row.tolist()), until) for row in new[: len(contexts) - first]]
    return out


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings."""
    return text[: min([text.find(stop) for stop in until if stop in text], default=len(text))]


def extract_number(text: str, pattern: str = r"The answer is (-?\d+)") -> str | None:
    """The answer a regex captures in `text` (its first group), or None when there is none."""
    found = re.search(pattern, text)
    return found.group(1) if found else None


def perplexity(
    model: GPT, params: Any, tokenizer: TextTokenizer, text: str, *, batch_size: int = 16
) -> dict[str, float]:
    """Per-token perplexity and bits per byte of `text`, scored in disjoint windows of the context
    length (each window's tokens predicted from the window before them; the first from end-of-text),
    as the harness's rolling log-likelihood does. Bits per byte compares models across tokenizers."""
    tokens = tokenizer.encode(text)
    if not tokens:
        raise ValueError("perplexity needs a non-empty text")
    length = model.cfg.context_length
    prefixed = [tokenizer.eos_id, *tokens]  # prefixed[start] is the token before tokens[start]
    windows = [
        (prefixed[max(0, start + 1 - length) : start + 1], tokens[start : start + length])
        for start in range(0, len(tokens), length)
    ]
    nll = -sum(logp for logp, _ in score_tokens(model, params, windows, batch_size=batch_size))
    return {
        "tokens": len(tokens),
        "bytes": len(text.encode("utf-8")),
        "token_perplexity": math.exp(nll / len(tokens)),
        "bits_per_byte": nll / math.log(2) / len(text.encode("utf-8")),
    }
