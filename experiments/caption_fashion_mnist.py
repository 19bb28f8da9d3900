"""Images and text together: a ViT encoder's image tokens as the prefix of a GPT decoder, trained on
Fashion-MNIST with captions and question/answer pairs made from the true labels, so that its accuracy
is a fact: on held-out test images, the share of generated captions and answers that are exactly a
right one, and the share that name the right class.

    python experiments/caption_fashion_mnist.py --data ~/fashion-mnist            # minutes on 2 cores
    python experiments/caption_fashion_mnist.py --vision-from runs/vit_fashion_mnist --freeze vision
    python experiments/caption_fashion_mnist.py --set text.num_layers=4 --set vision.d_model=128
    python experiments/caption_fashion_mnist.py --synthetic 64 --steps 2 --batch 16    # a smoke run, no data

A row is [image tokens] [prompt] [answer] <|endoftext|>. Half the training images are captioned
("Caption:" -> "a photo of an ankle boot", four phrasings), half answer a question ("What is this?"
-> "An ankle boot.", three questions). Image and prompt attend to each other both ways, the answer
causally (the prefix-LM mask); the loss is on the answer only. Generation goes through
`zoo.generate` with the image tokens as its prefix, greedy.

The towers: by default a ViT like vit_fashion_mnist.py's (4 x 4 patches of 7 x 7 pixels, its 17
positions the image tokens) and a 2-layer GPT, both trained from scratch, with a byte-level BPE
trained on the templates' text. Either tower can start from a zoo run or a transformers folder
(--vision-from, --text-from: a ViT; a GPT with its tokenizer) and be frozen (--freeze). The data
flags are vit_fashion_mnist.py's. Rerunning in the same --workdir resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import vit_fashion_mnist  # experiments/vit_fashion_mnist.py, beside this file: the data flags and the ViT
from etils import epath

import zoo
from zoo import adaptation, configs, experiment, tasks
from zoo.data import captions, images
from zoo.models import image_to_text
from zoo.models.image_to_text import ImageToText, ImageToTextConfig
from zoo.report import markdown_table
from zoo.runs import load_pretrained
from zoo.tokenizer import TextTokenizer, tokenizer_in, train_byte_level_bpe
from zoo.train import Task, recipes, train

VISION = vit_fashion_mnist.MODEL
TEXT = zoo.GPTConfig(
    vocab_size=512, context_length=48, num_layers=2, d_model=64, num_heads=4, d_ff=256, dropout=0.0, init_std=0.05
)
TEXT_LENGTH = 24  # prompt, answer and end token, padded
CAPTION_PROMPT = "Caption:"
TOWERS = {"vision": "encoder", "text": "decoder"}  # flag name -> the model's submodule
LEARNING_RATE, WARMUP = 2e-3, 100
EVAL_ROWS = 512  # test rows of the held-out loss the loop reports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = experiment.parser(__doc__, workdir="runs/caption_fashion_mnist", steps=800, batch=64, log_every=100)
    vit_fashion_mnist.add_data_flags(parser)
    add_tower_flags(parser)
    parser.add_argument(
        "--eval-images", type=experiment.positive, default=1000, help="held-out test images to caption (default 1000)"
    )
    parser.add_argument("--show", type=int, default=6, help="test images whose generations are printed (default 6)")
    parser.add_argument("--json", type=epath.Path, help="also write the accuracies to this file")
    return vit_fashion_mnist.checked(parser, parser.parse_args(argv))


def add_tower_flags(parser: argparse.ArgumentParser) -> None:
    """Where each tower's weights start, and which towers stay frozen (shared with the contrastive experiment)."""
    parser.add_argument(
        "--vision-from", type=epath.Path, help="start the image tower from a ViT: a zoo run or a transformers folder"
    )
    parser.add_argument(
        "--text-from",
        type=epath.Path,
        help="start the text tower from a GPT (and its tokenizer): a zoo run or a transformers folder",
    )
    parser.add_argument(
        "--freeze", nargs="*", choices=tuple(TOWERS), default=[], help="towers that are not trained (default none)"
    )


def pretrained(args: argparse.Namespace) -> dict[str, tuple[Any, Any, TextTokenizer | None]]:
    """{"vision"/"text": (config, params, tokenizer)} of the towers --vision-from and --text-from name."""
    towers = {}
    for tower, path, kind in (("vision", args.vision_from, zoo.ViTConfig), ("text", args.text_from, zoo.GPTConfig)):
        if path is not None:
            cfg, params, tokenizer = load_pretrained(path)
            if not isinstance(cfg, kind):
                raise SystemExit(f"--{tower}-from {path} holds a {type(cfg).__name__}, not a {kind.__name__}")
            towers[tower] = (cfg, jax.tree.map(np.asarray, params), tokenizer)
    return towers


def tokenizer_for(args: argparse.Namespace, towers: dict) -> TextTokenizer:
    """The text tower's tokenizer, else one trained on the templates' text (kept in --workdir)."""
    if "text" in towers:
        if towers["text"][2] is None:
            raise SystemExit(f"--text-from {args.text_from} holds no tokenizer")
        return towers["text"][2]
    if (args.workdir / "tokenizer.json").exists():
        return tokenizer_in(args.workdir)
    return train_byte_level_bpe([*captions.all_texts(), CAPTION_PROMPT], args.workdir / "tokenizer.json", 512)


def tower_configs(args: argparse.Namespace, towers: dict, tokenizer: TextTokenizer, cfg: Any) -> Any:
    """`cfg` (an image + text config) with the pretrained towers' configs and the tokenizer's vocabulary,
    then --set (e.g. text.num_layers=4)."""
    vision = towers["vision"][0] if "vision" in towers else cfg.vision
    text = towers["text"][0] if "text" in towers else dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size)
    return configs.override(dataclasses.replace(cfg, vision=vision, text=text), args.set)


def fitted(examples: images.ArrayExamples, cfg: zoo.ViTConfig) -> tuple[np.ndarray, np.ndarray]:
    """(float32 images [N, H, W, C] normalised and fitted to the image tower, labels [N])."""
    pixels = (np.asarray(examples.images, np.float32) / 255.0 - images.FASHION_MNIST_MEAN) / images.FASHION_MNIST_STD
    if pixels.shape[1:3] != cfg.image_size:
        pixels = np.asarray(jax.image.resize(pixels, (len(pixels), *cfg.image_size, 1), "bilinear"))
    return np.repeat(pixels, cfg.num_channels, axis=-1), np.asarray(examples.labels)


def prompts_and_answers(labels: Sequence[int], seed: int) -> tuple[list[str], list[str]]:
    """Half the examples captioned, half a question answered, chosen and phrased by `seed`."""
    rng = np.random.default_rng(seed)
    captioned = rng.random(len(labels)) < 0.5
    texts = captions.captions(labels, seed)
    pairs = captions.questions_answers(labels, seed + 1)
    prompts = [CAPTION_PROMPT if c else pair[0] for c, pair in zip(captioned, pairs)]
    answers = [text if c else pair[1] for c, text, pair in zip(captioned, texts, pairs)]
    return prompts, answers


def encoded(
    pixels: np.ndarray, labels: np.ndarray, tokenizer: TextTokenizer, seed: int, eval_batch: int | None = None
) -> dict[str, np.ndarray]:
    """`image_to_text.encode` of the images with their prompts and answers (cut to whole eval batches)."""
    if eval_batch is not None:
        keep = len(labels) // eval_batch * eval_batch
        pixels, labels = pixels[:keep], labels[:keep]
    prompts, answers = prompts_and_answers(labels, seed)
    encode = lambda texts: [tokenizer.encode(text) for text in texts]
    return image_to_text.encode(pixels, encode(prompts), encode(answers), tokenizer.eos_id, TEXT_LENGTH)


def start_from(towers: dict, names: dict[str, str] = TOWERS) -> Any:
    """The loop's `start_params`: the fresh params with the pretrained towers' weights in place, each
    under its module's name in `names` (a ViT's classifier head is not part of an image tower)."""

    def start(fresh: Any) -> Any:
        params = dict(fresh)
        for tower, (_, weights, _) in towers.items():
            module = names[tower]
            params[module] = {name: value for name, value in weights.items() if name in fresh[module]}
        return params

    return start


def frozen(
    task: Task, recipe: recipes.Recipe, towers: Sequence[str], names: dict[str, str] = TOWERS
) -> tuple[Task, Any]:
    """(`task`, AdamW) with the `towers` (as the flags name them; their modules in `names`) frozen: no
    gradient computed for them, no optimizer state held."""
    if not towers:
        return task, recipes.optimizer(recipe)
    params = nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    trainable = adaptation.where(params, "^(?!(" + "|".join(names[tower] for tower in towers) + ")/)")
    task = dataclasses.replace(task, loss_fn=adaptation.frozen(task.loss_fn, trainable))
    return task, adaptation.train_only(recipes.optimizer(recipe), trainable)


def trained(args: argparse.Namespace, mesh: Any, task: Task, cfg: Any, names: dict[str, str] = TOWERS) -> dict:
    """The loop's summary (final state, held-out loss) after training `task` (a model of config `cfg`) in
    --workdir with this family's AdamW recipe (then the recipe flags), the --freeze towers frozen (their
    modules in `names`)."""
    recipe = experiment.recipe_from_flags(
        args, recipes.Recipe(LEARNING_RATE, WARMUP, max(args.steps, WARMUP + 1), 0.0, 0.1, (0.9, 0.95))
    )
    task, optimizer = frozen(task, recipe, args.freeze, names)
    config = {
        "model": dataclasses.asdict(cfg),
        "recipe": dataclasses.asdict(recipe),
        "data": {flag: value for flag, value in vars(args).items() if flag in experiment.IMAGE_DATA_FLAGS},
        "args": vars(args),
    }
    summary = train(task, optimizer, mesh, args.workdir, experiment.loop_config(args), config)
    if summary.get("preempted"):
        raise SystemExit("preempted: rerun the same command to resume")
    return summary


def answers_of(
    model: ImageToText, params: Any, pixels: np.ndarray, prompts: list[str], tokenizer: TextTokenizer
) -> list[str]:
    """The greedy answers to each image's prompt, in batches of 250."""
    out = []
    for start in range(0, len(prompts), 250):
        encoded_prompts = [tokenizer.encode(text) for text in prompts[start : start + 250]]
        new = image_to_text.describe(
            model, params, pixels[start : start + 250], encoded_prompts, TEXT_LENGTH, stop_tokens=[tokenizer.eos_id]
        )
        out += [tokenizer.decode([t for t in row if t != tokenizer.eos_id]).strip() for row in np.asarray(new)]
    return out


def accuracies(
    model: ImageToText, params: Any, pixels: np.ndarray, labels: np.ndarray, tokenizer: TextTokenizer
) -> dict[str, dict]:
    """Per task ("captions", "answers"): exact-match accuracy (the text is one a template makes for the
    true class), class accuracy (it names the true class, and no other), and the generations."""
    n = len(labels)
    right_captions = [{captions.caption(int(y), t) for t in range(len(captions.CAPTION_TEMPLATES))} for y in labels]
    questions = [captions.question_answer(int(y), i % len(captions.QUESTIONS)) for i, y in enumerate(labels)]
    results = {}
    for task, prompts, rights in (
        ("captions", [CAPTION_PROMPT] * n, right_captions),
        ("answers", [q for q, _ in questions], [{a} for _, a in questions]),
    ):
        texts = answers_of(model, params, pixels, prompts, tokenizer)
        results[task] = {
            "exact": float(np.mean([text in right for text, right in zip(texts, rights)])),
            "class": float(np.mean([captions.label_of(text) == y for text, y in zip(texts, labels)])),
            "prompts": prompts,
            "texts": texts,
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mesh = experiment.start(args)
    experiment.check_batch(args, mesh)
    towers = pretrained(args)
    tokenizer = tokenizer_for(args, towers)
    cfg = tower_configs(args, towers, tokenizer, ImageToTextConfig(VISION, TEXT))
    train_pixels, train_labels = fitted(vit_fashion_mnist.examples(args, "train"), cfg.vision)
    test_pixels, test_labels = fitted(vit_fashion_mnist.examples(args, "test"), cfg.vision)
    model = ImageToText(cfg)
    task = tasks.image_captioning(
        model,
        encoded(train_pixels, train_labels, tokenizer, args.seed),
        encoded(test_pixels, test_labels, tokenizer, args.seed + 1, args.batch),
        args.batch,
        args.seed,
        eval_batches=max(1, EVAL_ROWS // args.batch),
        start_params=start_from(towers) if towers else None,
    )
    print(
        f"{len(train_labels):,} training and {len(test_labels):,} test images; {cfg.num_image_tokens} image tokens, "
        f"text vocabulary {cfg.text.vocab_size}; frozen: {', '.join(args.freeze) or 'nothing'}"
    )
    summary = trained(args, mesh, task, cfg)
    params = summary["state"]["params"]
    count = min(args.eval_images, len(test_labels))
    results = accuracies(model, params, test_pixels[:count], test_labels[:count], tokenizer)
    print(f"\n## Held-out test images ({count:,}), greedy generations\n")
    rows = [[task, f"{r['exact']:.2%}", f"{r['class']:.2%}"] for task, r in results.items()]
    print(markdown_table(["task", "exact match", "names the right class"], rows, left=1))
    print()
    for i in range(min(args.show, count)):
        label = captions.NOUNS[int(test_labels[i])]
        said = " | ".join(f"{r['prompts'][i]} -> {r['texts'][i]}" for r in results.values())
        print(f"image {i} ({label}): {said}")
    report = {task: {k: r[k] for k in ("exact", "class")} for task, r in results.items()}
    if args.json:
        args.json.write_text(json.dumps({**report, "eval_loss": summary.get("eval_loss")}, indent=2))
    return report


if __name__ == "__main__":
    main()
