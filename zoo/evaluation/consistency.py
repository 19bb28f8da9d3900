"""Self-consistency: sample several reasoning paths at a temperature, extract each one's final
answer, and take the majority (Wang et al. 2022), from one prefill of the prompt."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from zoo.evaluation.harness import cut_at, extract_number
from zoo.generation import generate
from zoo.models.gpt import GPT
from zoo.tokenizer import TextTokenizer


@dataclasses.dataclass(frozen=True)
class Vote:
    """The majority answer (None when no path gave one), the share of paths that gave it, and every
    path's answer in sampling order."""

    answer: str | None
    agreement: float
    answers: tuple[str | None, ...]


def vote(answers: Sequence[str | None]) -> Vote:
    """The most frequent extracted answer; a tie goes to the tied answer sampled first."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None, 0.0, tuple(answers))
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return Vote(winner, top / len(answers), tuple(answers))


def self_consistency(
    model: GPT,
    params: Any,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    k: int,
    *,
    temperature: float,
    rng: jax.Array,
    extract: Callable[[str], str | None] = extract_number,
    until: Sequence[str] = ("\n",),
    max_new_tokens: int = 64,
) -> list[Vote]:
    """For each prompt, the vote of `k` continuations sampled at `temperature` in one call (each
    prompt prefilled once, decoded in k rows), each cut at `until` before `extract` reads its answer."""
    new = generate(
        model,
        params,
        [tokenizer.encode(p) for p in prompts],
        max_new_tokens,
        temperature=temperature,
        stop_tokens=(tokenizer.eos_id,),
        rng=rng,
        samples=k,
    )
    texts = [cut_at(tokenizer.decode(row.tolist()), until) for row in jax.device_get(new)]
    return [vote([extract(t) for t in texts[i * k : (i + 1) * k]]) for i in range(len(prompts))]
