"""Image-to-text: a ViT encodes the image, a learned projection maps every position's final state into
the GPT's embedding space, and the GPT decoder reads them as a prefix of image tokens (PaliGemma's
form; SPEC.md, "Multimodal").

A row is [image tokens] [prompt] [answer] [padding]. The image tokens and the prompt (a question, or
a task word such as "Caption:") form the bidirectional prefix of the prefix-LM mask: they see each
other both ways; the answer is causal and sees the whole prefix. The loss covers the answer and its
end token only. The attention mask (`bidirectional`) and the loss mask (`loss_mask`) are two things.

    model = ImageToText(ImageToTextConfig(vision=vit_cfg, text=gpt_cfg))
    batch = encode(images, prompts, answers, eos_id, length=16)     # token-id lists
    loss, accuracy = image_to_text.loss(model, params, batch)
    new = describe(model, params, images, prompts, max_new_tokens=8, stop_tokens=[eos_id])

Generation runs through `zoo.generate`: the image tokens are its `prefix`, prefilled once with the
prompt, and the answer is decoded over the KV cache (banded layers keep their ring caches).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.generation import generate
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.nn.transformer import dense_init, zeros_init


@dataclasses.dataclass(frozen=True)
class ImageToTextConfig:
    """The two towers' configs. Every position of the ViT (its [CLS] token too, with "token" pooling)
    becomes an image token; the ViT's head and class count go unused."""

    vision: ViTConfig
    text: GPTConfig

    def __post_init__(self) -> None:
        if self.num_image_tokens >= self.text.context_length:
            raise ValueError(
                f"{self.num_image_tokens} image tokens leave no room for text in the decoder's "
                f"context_length={self.text.context_length}: raise it or use larger patches"
            )

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_positions


class ImageToText(nn.Module):
    """(images [B, H, W, C], tokens [B, T], prompt_lengths [B]) -> next-token logits [B, T, vocab] of
    the text, after the image tokens; the first `prompt_lengths` tokens join the bidirectional prefix."""

    cfg: ImageToTextConfig

    def setup(self) -> None:
        text = self.cfg.text
        self.encoder = ViT(self.cfg.vision)
        self.projection = nn.Dense(
            text.d_model,
            dtype=text.dtype,
            param_dtype=text.param_dtype,
            kernel_init=dense_init(text.init_std, (None, "embed")),
            bias_init=zeros_init(("embed",)),
        )
        self.decoder = GPT(text)

    def image_tokens(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """The image's tokens in the decoder's embedding space [B, num_image_tokens, d_model]."""
        tokens = self.projection(self.encoder.features(images, deterministic))
        return nn.with_logical_constraint(tokens, ("batch", "length", "embed"))

    def __call__(
        self, images: jax.Array, tokens: jax.Array, prompt_lengths: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        image = self.image_tokens(images, deterministic)
        bidirectional = image.shape[1] + prompt_lengths
        return self.decoder(tokens, deterministic, prefix=image, bidirectional=bidirectional)


def encode(
    images: np.ndarray,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    eos_id: int,
    length: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """A batch: "image" as given, "tokens" [N, length + 1] (prompt, answer, end token, padding),
    "prompt_lengths" [N] and "loss_mask" [N, length] over the predicted tokens tokens[:, 1:], 1 on
    the answer and its end token. A row longer than length + 1 is refused, naming it."""
    tokens = np.full((len(prompts), length + 1), pad_id, np.int32)
    loss_mask = np.zeros((len(prompts), length), np.float32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not prompt:
            raise ValueError(f"row {i}: an empty prompt; the first answer token is predicted from the prompt's last")
        row = [*prompt, *answer, eos_id]
        if len(row) > length + 1:
            raise ValueError(f"row {i} holds {len(row)} tokens (prompt, answer, end), past length + 1 = {length + 1}")
        tokens[i, : len(row)] = row
        loss_mask[i, len(prompt) - 1 : len(row) - 1] = 1.0
    prompt_lengths = np.array([len(prompt) for prompt in prompts], np.int32)
    return {"image": images, "tokens": tokens, "prompt_lengths": prompt_lengths, "loss_mask": loss_mask}


def loss(model: ImageToText, params: Any, batch: dict, **apply_kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """(mean next-token cross-entropy over the answer tokens, their teacher-forced token accuracy)."""
    tokens = batch["tokens"]
    logits = model.apply({"params": params}, batch["image"], tokens[:, :-1], batch["prompt_lengths"], **apply_kwargs)
    targets, mask = tokens[:, 1:], batch["loss_mask"]
    count = jnp.maximum(mask.sum(), 1.0)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return (cross_entropy * mask).sum() / count, (correct * mask).sum() / count


def describe(
    model: ImageToText,
    params: Any,
    images: jax.Array,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    **sampling: Any,
) -> jax.Array:
    """The answers' tokens [B, max_new_tokens] to each image's prompt, by `zoo.generate` with the
    image tokens as the prefix (greedy unless `sampling` says otherwise; see `generate`)."""
    image = _image_tokens(model, params, images)
    return generate(GPT(model.cfg.text), params["decoder"], prompts, max_new_tokens, prefix=image, **sampling)


@functools.partial(jax.jit, static_argnums=0)
def _image_tokens(model: ImageToText, params: Any, images: jax.Array) -> jax.Array:
    return model.apply({"params": params}, images, method=ImageToText.image_tokens)
