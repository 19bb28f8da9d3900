"""Contrastive image-text pretraining on Fashion-MNIST and its template captions: a ViT image tower and
a GPT text tower learn a shared space (SigLIP's sigmoid loss, or CLIP's softmax with --loss clip);
then the test images are classified zero-shot, by the nearest of ten class prompts ("a photo of a
sandal"), beside a supervised ViT's accuracy, and captions and images retrieve each other.

    python experiments/contrastive_fashion_mnist.py --data ~/fashion-mnist        # minutes on 2 cores
    python experiments/contrastive_fashion_mnist.py --loss clip --supervised runs/vit_fashion_mnist
    python experiments/contrastive_fashion_mnist.py --synthetic 64 --steps 2 --batch 16   # a smoke run

Each training image is paired with one caption of its class (four phrasings); the text tower reads
the caption and an end token, whose final state is the text's embedding ("last" pooling). The losses
cover the global batch: under a mesh the text embeddings are gathered to every device (see
zoo.models.two_tower). Captions of the same class are negatives of each other in a batch, as in any
CLIP-style training on class-level text; retrieval counts a hit when the retrieved caption (image)
is of the query's class. The towers, --vision-from, --text-from, --freeze and the data flags are
caption_fashion_mnist.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import caption_fashion_mnist as captioning  # experiments/caption_fashion_mnist.py, beside this file
import jax
import numpy as np
import vit_fashion_mnist
from etils import epath

from zoo import experiment, tasks
from zoo.data import captions
from zoo.models import two_tower
from zoo.models.two_tower import TwoTower, TwoTowerConfig
from zoo.report import markdown_table
from zoo.runs import load_vit
from zoo.tokenizer import TextTokenizer

TEXT = dataclasses.replace(captioning.TEXT, context_length=16)
TOWERS = {"vision": "image_encoder", "text": "text_encoder"}
EVAL_ROWS = 512  # test pairs of the held-out loss the loop reports
BATCH = 1000  # images embedded at a time for evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = experiment.parser(__doc__, workdir="runs/contrastive_fashion_mnist", steps=800, batch=128, log_every=100)
    vit_fashion_mnist.add_data_flags(parser)
    captioning.add_tower_flags(parser)
    parser.add_argument(
        "--loss", choices=two_tower.LOSSES, default="siglip", help="the contrastive loss (default siglip)"
    )
    parser.add_argument(
        "--supervised", type=epath.Path, help="a vit_fashion_mnist.py run whose test accuracy is shown beside"
    )
    parser.add_argument(
        "--retrieval-pairs", type=experiment.positive, default=1000, help="test pairs for retrieval (default 1000)"
    )
    parser.add_argument("--json", type=epath.Path, help="also write the accuracies to this file")
    return vit_fashion_mnist.checked(parser, parser.parse_args(argv))


def encoded(pixels: np.ndarray, labels: np.ndarray, tokenizer: TextTokenizer, seed: int, length: int) -> dict:
    """{"image", "tokens" [N, length] (a caption of each image's class, its end token, padding), "lengths"}."""
    return {"image": pixels, **texts(captions.captions(labels, seed), tokenizer, length)}


def texts(strings: list[str], tokenizer: TextTokenizer, length: int) -> dict[str, np.ndarray]:
    """{"tokens" [N, length], "lengths" [N]}: each text's tokens and the end token, padded."""
    rows = [[*tokenizer.encode(text), tokenizer.eos_id] for text in strings]
    if max(map(len, rows)) > length:
        raise ValueError(f"a text of {max(map(len, rows))} tokens (its end token included) passes {length}")
    tokens = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return {"tokens": tokens, "lengths": np.array([len(row) for row in rows], np.int32)}


def embedded_images(model: TwoTower, params: Any, pixels: np.ndarray) -> np.ndarray:
    embed = jax.jit(lambda p, x: model.apply({"params": p}, x, method=TwoTower.embed_images))
    return np.concatenate([np.asarray(embed(params, pixels[i : i + BATCH])) for i in range(0, len(pixels), BATCH)])


def embedded_texts(model: TwoTower, params: Any, encoded_texts: dict) -> np.ndarray:
    embed = jax.jit(lambda p, t, n: model.apply({"params": p}, t, n, method=TwoTower.embed_texts))
    tokens, lengths = encoded_texts["tokens"], encoded_texts["lengths"]
    return np.concatenate(
        [np.asarray(embed(params, tokens[i : i + BATCH], lengths[i : i + BATCH])) for i in range(0, len(tokens), BATCH)]
    )


def evaluate(
    model: TwoTower, params: Any, pixels: np.ndarray, labels: np.ndarray, tokenizer: TextTokenizer, pairs: int
) -> dict:
    """Zero-shot accuracy on every test image with each caption template as the class prompts, and
    recall@1 both ways over the first `pairs` test images and their captions (a hit: the class matches)."""
    length = model.cfg.text.context_length
    zero_shot = {}
    for template in captions.CAPTION_TEMPLATES:
        prompts = texts(captions.zero_shot_prompts(template), tokenizer, length)
        predicted = [
            np.asarray(two_tower.zero_shot(model, params, pixels[i : i + BATCH], prompts["tokens"], prompts["lengths"]))
            for i in range(0, len(pixels), BATCH)
        ]
        zero_shot[template] = float(np.mean(np.concatenate(predicted) == labels))
    images = embedded_images(model, params, pixels[:pairs])
    captions_of_pairs = captions.captions(labels[:pairs], seed=1)
    text_embeddings = embedded_texts(model, params, texts(captions_of_pairs, tokenizer, length))
    similarity = images @ text_embeddings.T
    labels_of_pairs = labels[:pairs]
    return {
        "zero_shot": zero_shot,
        "image_to_text_recall@1": float(np.mean(labels_of_pairs[np.argmax(similarity, axis=1)] == labels_of_pairs)),
        "text_to_image_recall@1": float(np.mean(labels_of_pairs[np.argmax(similarity, axis=0)] == labels_of_pairs)),
    }


def supervised_accuracy(run: epath.Path, pixels: np.ndarray, labels: np.ndarray) -> float:
    """The test accuracy of a vit_fashion_mnist.py run on the same images."""
    model, params, _ = load_vit(run)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))
    batches = range(0, len(pixels), BATCH)
    predicted = np.concatenate([np.argmax(logits(params, pixels[i : i + BATCH]), -1) for i in batches])
    return float(np.mean(predicted == labels))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mesh = experiment.start(args)
    experiment.check_batch(args, mesh)
    towers = captioning.pretrained(args)
    tokenizer = captioning.tokenizer_for(args, towers)
    base = TwoTowerConfig(captioning.VISION, TEXT, embed_dim=64, loss=args.loss)
    cfg = captioning.tower_configs(args, towers, tokenizer, base)
    train_pixels, train_labels = captioning.fitted(vit_fashion_mnist.examples(args, "train"), cfg.vision)
    test_pixels, test_labels = captioning.fitted(vit_fashion_mnist.examples(args, "test"), cfg.vision)
    model, length = TwoTower(cfg), cfg.text.context_length
    task = tasks.contrastive(
        model,
        encoded(train_pixels, train_labels, tokenizer, args.seed, length),
        encoded(test_pixels, test_labels, tokenizer, args.seed + 1, length),
        args.batch,
        args.seed,
        eval_batches=max(1, EVAL_ROWS // args.batch),
        start_params=captioning.start_from(towers, TOWERS) if towers else None,
    )
    print(
        f"{len(train_labels):,} training and {len(test_labels):,} test images; {args.loss} loss over batches of "
        f"{args.batch}; frozen: {', '.join(args.freeze) or 'nothing'}"
    )
    params = captioning.trained(args, mesh, task, cfg, TOWERS)["state"]["params"]
    pairs = min(args.retrieval_pairs, len(test_labels))
    report = evaluate(model, params, test_pixels, test_labels, tokenizer, pairs)
    if args.supervised is not None:
        report["supervised"] = supervised_accuracy(args.supervised, test_pixels, test_labels)
    print(f"\n## {len(test_labels):,} test images: zero-shot classification by the nearest class prompt\n")
    shown = lambda template: '"' + template.format(a="a", A="A", noun="{label}") + '"'
    rows = [[shown(template), f"{accuracy:.2%}"] for template, accuracy in report["zero_shot"].items()]
    if "supervised" in report:
        rows.append([f"supervised ViT ({args.supervised})", f"{report['supervised']:.2%}"])
    print(markdown_table(["class prompts", "test accuracy"], rows, left=1))
    print(
        f"\nretrieval over {pairs:,} test pairs, recall@1 (the class matches): image -> text "
        f"{report['image_to_text_recall@1']:.2%}, text -> image {report['text_to_image_recall@1']:.2%}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
