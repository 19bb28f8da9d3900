"""ViT-B/16 trained from scratch on ImageNet at 224 x 224, at pod scale, with the ViT paper's recipe
(Dosovitskiy et al., 2020, Table 3; zoo.train.recipes "vit-imagenet"): batch 4096, 300 epochs,
Adam β = (0.9, 0.999), peak learning rate 3e-3 after 10k linear warm-up steps, cosine decay, weight
decay 0.3 (decoupled, as optax.adamw: times the learning rate), dropout 0.1, gradient clipping at
global norm 1. Computed in bfloat16 with float32 parameters, layers rematerialised (dots_no_batch),
parameters and optimizer state sharded over every device (--mesh fsdp=-1).

    python experiments/vit_b16_imagenet.py --data-dir ~/tensorflow_datasets --workdir gs://BUCKET/vit   # on each host
    python experiments/vit_b16_imagenet.py --mock --steps 2 --batch 8 --set num_layers=1 \\
        --set d_model=32 --set num_heads=2 --set d_ff=64 --set image_size=32      # a smoke run

Data: the tfds build of imagenet2012, which tfds cannot download: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in DATA_DIR/downloads/manual and the first run builds it. Images are
resized (shorter side to 224, centre crop), shifted by up to 16 pixels and flipped at random (not
the paper's Inception crop) and scaled to [-1, 1] as in the ViT code. The default learning rate
scales linearly with --batch (--lr sets the peak itself). Evaluation at the end covers the whole
batches of the 50,000 validation images. Rerunning in the same --workdir resumes.
"""

from __future__ import annotations

import argparse

from etils import epath

import zoo
from zoo import experiment
from zoo.data.images import ArrayExamples, SourceExamples, synthetic_examples, tfds_examples
from zoo.train import recipes

MODEL = zoo.configs.vit("vit-b/16", dropout=0.1, dtype="bfloat16", remat="dots_no_batch")
EPOCH_STEPS = 1_281_167 / recipes.VIT_BATCH  # steps per epoch of ImageNet's 1,281,167 training images
MEAN, STD = (0.5,) * 3, (0.5,) * 3  # pixels to [-1, 1]
SHIFT = 16  # pixels of random shift


def parse_args() -> argparse.Namespace:
    """The flags, with this experiment's defaults."""
    parser = experiment.parser(
        __doc__,
        workdir="runs/vit_b16_imagenet",
        steps=round(300 * EPOCH_STEPS),
        batch=recipes.VIT_BATCH,
        log_every=100,
        checkpoint_every=2000,
        mesh="fsdp=-1",
    )
    parser.add_argument(
        "--data-dir",
        type=epath.Path,
        help="tfds data dir holding (or to build) imagenet2012, on each host's disk (without "
        "TensorFlow, tfds's array_record files are local files; default: tfds's own, "
        "$TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--mock", action="store_true", help="random images of the model's size instead of ImageNet (tests, smoke runs)"
    )
    return parser.parse_args()


def examples(args: argparse.Namespace, cfg: zoo.ViTConfig, split: str) -> ArrayExamples | SourceExamples:
    """The `split` ("train" or "validation") of ImageNet, or of random images with --mock."""
    if args.mock:
        count = 2 * args.batch if split == "train" else args.batch
        return synthetic_examples(
            count, cfg.image_size, cfg.num_channels, cfg.num_classes, seed=args.seed + (split != "train")
        )
    return tfds_examples("imagenet2012", split, args.data_dir, image_size=cfg.image_size)


def main() -> None:
    args = parse_args()
    recipe = recipes.recipe("vit-imagenet", batch=args.batch, steps=args.steps)
    data = experiment.ImageData(lambda cfg, split: examples(args, cfg, split), MEAN, STD, pad=SHIFT)
    experiment.run_image_classifier(args, MODEL, recipe, data)


if __name__ == "__main__":
    main()
