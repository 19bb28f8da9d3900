"""GPT-1's supervised fine-tuning (Radford et al., 2018, sections 3.2 and 3.3): each task's
structured input becomes token sequences framed by new start, delimiter and extract tokens; a
linear head reads the final state at the extract token; the language-model loss on the same
sequences stays on as an auxiliary term (L = L_task + λ · L_LM, λ = 0.5).

    cfg, params, tokenizer = finetune.add_special_tokens(cfg, params, tokenizer, key)
    batch, cut = finetune.encode("entailment", examples, tokenizer, cfg.context_length)
    model = finetune.Classifier(cfg, "entailment", num_classes=2)
    loss, accuracy = finetune.loss(lm_weight=0.5)(model, {"gpt": params, "head": ...}, batch)

Input transforms (one sequence per row of C, all [start] ... [extract]):
- classification (C = 1): text
- entailment (C = 1): premise [delimiter] hypothesis
- similarity (C = 2): a [delimiter] b and b [delimiter] a; their final states are added
- choice (C = options): context [delimiter] option, one score each, a softmax over the options
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.models.gpt import GPT, GPTConfig
from zoo.nn.transformer import dense_init, zeros_init
from zoo.tokenizer import TextTokenizer, WithSpecialTokens

KINDS = ("classification", "entailment", "similarity", "choice")
SPECIAL_TOKENS = ("start", "delimiter", "extract")  # GPT-1's input transforms


def add_special_tokens(
    cfg: GPTConfig,
    params: Any,
    tokenizer: TextTokenizer,
    rng: jax.Array,
    multiple_of: int = 1,
    names: Sequence[str] = SPECIAL_TOKENS,
) -> tuple[GPTConfig, Any, WithSpecialTokens]:
    """(config, params, tokenizer) with new tokens `names` (default GPT-1's start, delimiter and
    extract) after the model's vocabulary: new embedding rows drawn from N(0, init_std), the old
    ones unchanged; the output layer is tied to the embedding, so it gains the rows too. The
    vocabulary grows to a multiple of `multiple_of` (e.g. a tensor axis that shards it); rows past
    the new tokens are never used."""
    tokenizer.check_vocab(cfg.vocab_size)
    old = params["token_embed"]["embedding"]
    size = -(-(cfg.vocab_size + len(names)) // multiple_of) * multiple_of
    rows = cfg.init_std * jax.random.normal(rng, (size - cfg.vocab_size, cfg.d_model), old.dtype)
    embedding = jnp.concatenate([old, rows])
    new_params = {**params, "token_embed": {**params["token_embed"], "embedding": embedding}}
    return dataclasses.replace(cfg, vocab_size=size), new_params, WithSpecialTokens(tokenizer, cfg.vocab_size, names)


def encode(
    kind: str, examples: Sequence[Any], tokenizer: WithSpecialTokens, length: int
) -> tuple[dict[str, np.ndarray], int]:
    """(batch, how many examples were cut): the examples (each with `texts` and `label`) as
    {"tokens" int32 [N, C, length], "extract" int32 [N, C] (the extract token's position), "mask"
    float32 [N, C, length] (1 on real tokens), "label" int32 [N]}. An example too long for `length`
    loses tokens from its longest text, one at a time: the first text (passage, premise, context)
    from its start, keeping what meets the delimiter; the others from their end."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    if not examples:
        raise ValueError("no examples to encode")
    rows = [_sequences(kind, [tokenizer.encode(t) for t in example.texts], tokenizer, length) for example in examples]
    width = max(len(sequences) for sequences, _ in rows)
    if any(len(sequences) != width for sequences, _ in rows):
        raise ValueError(f"every {kind} example needs the same number of texts")
    tokens = np.full((len(rows), width, length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), width, length), np.float32)
    extract = np.zeros((len(rows), width), np.int32)
    for n, (sequences, _) in enumerate(rows):
        for c, sequence in enumerate(sequences):
            tokens[n, c, : len(sequence)] = sequence
            mask[n, c, : len(sequence)] = 1
            extract[n, c] = len(sequence) - 1
    labels = np.array([example.label for example in examples], np.int32)
    return {"tokens": tokens, "extract": extract, "mask": mask, "label": labels}, sum(cut for _, cut in rows)


def _sequences(
    kind: str, texts: list[list[int]], tokenizer: WithSpecialTokens, length: int
) -> tuple[list[list[int]], bool]:
    """An example's C token sequences, and whether its texts were cut to fit."""
    expected = {"classification": 1, "entailment": 2, "similarity": 2}.get(kind)
    if (expected is not None and len(texts) != expected) or (kind == "choice" and len(texts) < 3):
        raise ValueError(f"a {kind} example has {len(texts)} texts; it needs {expected or 'a context and 2+ options'}")
    start, delimiter, extract = tokenizer.start, tokenizer.delimiter, tokenizer.extract
    if kind == "classification":
        pairs = [_fit(texts, length - 2)]
    elif kind == "choice":
        pairs = [_fit([texts[0], option], length - 3) for option in texts[1:]]
    else:
        pairs = [_fit(texts, length - 3)]
        if kind == "similarity":  # both orders, cut the same way
            pairs.append(pairs[0][::-1])
    sequences = [
        [start, *parts[0], extract] if kind == "classification" else [start, *parts[0], delimiter, *parts[1], extract]
        for parts in pairs
    ]
    kept = sum(len(part) for parts in pairs for part in parts)
    given = sum(map(len, texts)) if kind != "choice" else sum(len(texts[0]) + len(o) for o in texts[1:])
    return sequences, kept < given * (2 if kind == "similarity" else 1)


def _fit(texts: list[list[int]], budget: int) -> list[list[int]]:
    """`texts` shortened to `budget` tokens in all: the longest (of equals, the first) loses a token
    until they fit; the first text keeps its end, the others their beginnings."""
    if budget < len(texts):
        raise ValueError(f"the context leaves {budget} tokens for {len(texts)} texts")
    sizes = [len(t) for t in texts]
    while sum(sizes) > budget:
        sizes[int(np.argmax(sizes))] -= 1
    return [text[len(text) - size :] if i == 0 else text[:size] for i, (text, size) in enumerate(zip(texts, sizes))]


class Classifier(nn.Module):
    """A GPT with a linear head on the extract token's final state: {"tokens" [B, C, T], "extract"
    [B, C]} -> (task logits [B, K], next-token logits [B, C, T, vocab] or None). K is the number of
    classes, or the number of options for "choice" (one score per sequence)."""

    cfg: GPTConfig
    kind: str
    num_classes: int
    head_dropout: float = 0.1  # GPT-1's classifier dropout

    def setup(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; choose one of {KINDS}")
        self.gpt = GPT(self.cfg)
        outputs = 1 if self.kind == "choice" else self.num_classes
        self.head = nn.Dense(
            outputs,
            kernel_init=dense_init(self.cfg.init_std, ("embed", "classes")),
            bias_init=zeros_init(("classes",)),
            param_dtype=self.cfg.param_dtype,
        )
        self.dropout = nn.Dropout(self.head_dropout)

    def __call__(
        self, batch: dict, deterministic: bool = True, lm: bool = True, prefix: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """The task logits and (with `lm`) the next-token logits; a `prefix` of embeddings (prompt
        tuning) goes before every sequence."""
        tokens = batch["tokens"]
        b, c, t = tokens.shape
        hidden = self.gpt.hidden_states(tokens.reshape(b * c, t), deterministic, prefix).reshape(b, c, t, -1)
        final = jnp.take_along_axis(hidden, batch["extract"][:, :, None, None], axis=2)[:, :, 0]  # [B, C, d]
        if self.kind == "similarity":
            final = final.sum(axis=1, keepdims=True)
        scores = self.head(self.dropout(final, deterministic=deterministic)).astype(jnp.float32)
        logits = scores[..., 0] if self.kind == "choice" else scores[:, 0]
        return logits, self.gpt.logits(hidden) if lm else None


def lm_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The auxiliary language-model loss: next-token cross-entropy over each sequence's real
    tokens, averaged per sequence, then over sequences (as GPT-1's released code did)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[..., :-1, :], tokens[..., 1:])
    weights = mask[..., 1:]
    return jnp.mean(jnp.sum(losses * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1))


def loss(lm_weight: float = 0.5) -> Callable:
    """The loss function `(model, params, batch, **apply_kwargs) -> (loss, accuracy)`: the task's
    cross-entropy plus `lm_weight` times `lm_loss` (0: the task loss alone, no LM logits computed)."""

    def classifier_loss(model: Classifier, params: Any, batch: dict, **kwargs: Any) -> tuple[jax.Array, jax.Array]:
        logits, lm_logits = model.apply({"params": params}, batch, lm=lm_weight > 0, **kwargs)
        total = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        if lm_weight > 0:
            total = total + lm_weight * lm_loss(lm_logits, batch["tokens"], batch["mask"])
        return total, (jnp.argmax(logits, -1) == batch["label"]).mean()

    return classifier_loss


def predict(
    model: Classifier, params: Any, batch: dict, batch_size: int = 64, prefix: jax.Array | None = None
) -> np.ndarray:
    """The predicted class (or option) of every example of an encoded `batch`, in batches."""
    apply = jax.jit(lambda p, b: jnp.argmax(model.apply({"params": p}, b, lm=False, prefix=prefix)[0], -1))
    size = len(batch["label"])
    out = []
    for begin in range(0, size, batch_size):
        part = {key: value[begin : begin + batch_size] for key, value in batch.items() if key != "label"}
        short = batch_size - len(part["tokens"])
        part = {key: np.concatenate([value, np.repeat(value[-1:], short, 0)]) for key, value in part.items()}
        out.append(np.asarray(apply(params, part))[: batch_size - short])
    return np.concatenate(out)
