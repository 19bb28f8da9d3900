"""The chat format: a conversation of (role, text) messages, each framed by its role token and an
end token, all four new tokens after the model's vocabulary; the loss is on the assistant's tokens
(its texts and their end tokens) only.

    cfg, params, tokenizer = chat.add_chat_tokens(cfg, params, tokenizer, key)
    <|user|>Reply in at most 3 words.<|end|><|assistant|>To be.<|end|>
    batch, cut = chat.encode([[("user", "Hi."), ("assistant", "Good morrow.")]], tokenizer, length=64)
    text = chat.reply(model, params, tokenizer, [("user", "12 + 30 =")])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.adaptation import finetune
from zoo.generation import generate
from zoo.models.gpt import GPT, GPTConfig
from zoo.tokenizer import TextTokenizer, WithSpecialTokens

ROLES = ("system", "user", "assistant")
TOKENS = (*ROLES, "end")

Message = tuple[str, str]  # (role, text)


def add_chat_tokens(
    cfg: GPTConfig, params: Any, tokenizer: TextTokenizer, rng: jax.Array, multiple_of: int = 1
) -> tuple[GPTConfig, Any, WithSpecialTokens]:
    """(config, params, tokenizer) with the role and end tokens after the model's vocabulary, as
    `finetune.add_special_tokens` adds tokens; record `special_tokens(tokenizer)` in the run's
    config so that `zoo.load` gives the tokenizer back."""
    return finetune.add_special_tokens(cfg, params, tokenizer, rng, multiple_of, names=TOKENS)


def special_tokens(tokenizer: WithSpecialTokens) -> dict:
    """What a run's config records of its added tokens (`zoo.load` reads it back)."""
    return {"first": tokenizer.first, "names": list(tokenizer.names)}


def render(messages: Sequence[Message], tokenizer: WithSpecialTokens) -> tuple[list[int], list[int]]:
    """(tokens, mask) of a conversation: each message as [role] text [end]; the mask is 1 on the
    tokens the model learns to write (an assistant message's text and end token), 0 elsewhere."""
    tokens, mask = [], []
    for role, text in messages:
        if role not in ROLES:
            raise ValueError(f"role {role!r}; a message's role is one of {ROLES}")
        body = [*tokenizer.encode(text), tokenizer.end]
        tokens += [getattr(tokenizer, role), *body]
        mask += [0, *[int(role == "assistant")] * len(body)]
    return tokens, mask


def prompt(messages: Sequence[Message], tokenizer: WithSpecialTokens) -> list[int]:
    """The tokens that ask for the next assistant message: the conversation, then [assistant]."""
    return [*render(messages, tokenizer)[0], tokenizer.assistant]


def encode(
    conversations: Sequence[Sequence[Message]], tokenizer: WithSpecialTokens, length: int
) -> tuple[dict[str, np.ndarray], int]:
    """(batch, how many conversations were cut): {"tokens" int32 [N, length + 1], "mask" float32
    [N, length + 1]}, right-padded; a conversation longer than length + 1 tokens keeps its start."""
    if not conversations:
        raise ValueError("no conversations to encode")
    tokens = np.full((len(conversations), length + 1), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(conversations), length + 1), np.float32)
    cut = 0
    for n, messages in enumerate(conversations):
        ids, weights = render(messages, tokenizer)
        cut += len(ids) > length + 1
        tokens[n, : len(ids[: length + 1])] = ids[: length + 1]
        mask[n, : len(weights[: length + 1])] = weights[: length + 1]
    return {"tokens": tokens, "mask": mask}, cut


def padded_prompts(
    conversations: Sequence[Sequence[Message]], tokenizer: WithSpecialTokens, width: int
) -> dict[str, np.ndarray]:
    """{"prompt" int32 [N, width] right-padded, "length" int32 [N]}: the prompts asking for each
    conversation's next assistant message (`prompt`), for rollouts compiled with their batch."""
    rows = [prompt(messages, tokenizer) for messages in conversations]
    longest = max(map(len, rows))
    if longest > width:
        raise ValueError(f"a prompt of {longest} tokens does not fit in {width}")
    padded = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    for n, row in enumerate(rows):
        padded[n, : len(row)] = row
    return {"prompt": padded, "length": np.array([len(row) for row in rows], np.int32)}


def loss(model: GPT, params: Any, batch: dict, **apply_kwargs: Any) -> jax.Array:
    """Supervised fine-tuning's loss: next-token cross-entropy averaged over the tokens whose mask
    is 1 (the assistant's), on rows of length + 1 tokens."""
    logits = model.apply({"params": params}, batch["tokens"][:, :-1], **apply_kwargs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    weights = batch["mask"][:, 1:]
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


def response_text(tokens: Sequence[int], tokenizer: WithSpecialTokens) -> str:
    """The text of a generated reply: its tokens up to (without) the first end token."""
    tokens = list(tokens)
    if tokenizer.end in tokens:
        tokens = tokens[: tokens.index(tokenizer.end)]
    return tokenizer.decode(tokens)


def reply(
    model: GPT,
    params: Any,
    tokenizer: WithSpecialTokens,
    conversations: Sequence[Sequence[Message]],
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
) -> list[str]:
    """The assistant's next message in each conversation, generated (greedy at temperature 0) up
    to its end token."""
    prompts = [prompt(messages, tokenizer) for messages in conversations]
    new = generate(
        model, params, prompts, max_new_tokens, temperature=temperature, stop_tokens=(tokenizer.end,), rng=rng
    )
    return [response_text(row, tokenizer) for row in np.asarray(new).tolist()]
