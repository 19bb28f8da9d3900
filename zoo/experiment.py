"""What experiment files share: the common flags, multi-host start-up, the mesh, the
language-model run (text in, trained model, validation loss and samples out) and the
image-classifier run (labelled images in, trained ViT and its accuracy out)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import absl.logging
import jax
import tensorflow_datasets as tfds
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from zoo import configs, sharding, tasks
from zoo.data.images import ArrayExamples, ImagePipeline, SourceExamples
from zoo.data.text import PackedCorpus, open_corpus, prepare_corpus
from zoo.generation import generate
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.paths import write_atomically
from zoo.train import recipes
from zoo.train.loop import LoopConfig, Task, train
from zoo.train.recipes import Recipe


def parser(
    doc: str,
    *,
    workdir: str,
    steps: int,
    batch: int,
    log_every: int = 50,
    checkpoint_every: int = 500,
    mesh: str = "data=-1",
    parents: tuple[argparse.ArgumentParser, ...] = (),
) -> argparse.ArgumentParser:
    """An argument parser with the flags every experiment takes; the experiment adds its own."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents)
    )
    p.add_argument(
        "--workdir",
        type=epath.Path,
        default=epath.Path(workdir),
        help=f"checkpoints, metrics and config, a folder or a URL such as gs://bucket/run (every "
        f"host of a pod needs the same one); rerunning in the same workdir resumes (default {workdir})",
    )
    p.add_argument(
        "--mesh",
        default=mesh,
        help=f"a layout {tuple(sharding.LAYOUTS)} or a mesh such as data=2,fsdp=2,tensor=2 "
        f"(-1 takes the remaining devices; default {mesh})",
    )
    p.add_argument(
        "--steps",
        type=positive,
        default=steps,
        help=f"training steps in all (default {steps}); a resumed run trains the steps past its "
        f"checkpoint, and does nothing if there are none",
    )
    p.add_argument("--batch", type=positive, default=batch, help=f"global batch size in rows (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout (default 0)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config field, e.g. --set num_layers=6 (repeatable)",
    )
    p.add_argument(
        "--grad-accum",
        type=positive,
        default=1,
        help="micro-batches per optimizer step: the batch is split k ways (default 1)",
    )
    p.add_argument(
        "--log-every",
        type=positive,
        default=log_every,
        help=f"steps between metrics, at least 1; the last step is always logged (default {log_every})",
    )
    p.add_argument(
        "--eval-every",
        type=non_negative,
        default=0,
        help="steps between evaluations; 0: only after the last step (default 0)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=non_negative,
        default=checkpoint_every,
        help=f"steps between checkpoints; 0: only after the last step and on preemption (default {checkpoint_every})",
    )
    p.add_argument(
        "--max-bad-steps",
        type=positive,
        default=LoopConfig.max_bad_steps,
        help=f"stop the run after this many consecutive steps with a NaN or Inf loss or gradient "
        f"(each is skipped: no update; default {LoopConfig.max_bad_steps})",
    )
    add_recipe_flags(p)
    p.add_argument("--coordinator-address", help="host:port of process 0, for multi-process runs off TPU")
    p.add_argument("--num-processes", type=int, help="number of processes (with --coordinator-address)")
    p.add_argument("--process-id", type=int, help="this process's index (with --coordinator-address)")
    return p


def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the flag in its error)."""
    return _at_least(text, 1)


def non_negative(text: str) -> int:
    """An argparse type: an integer >= 0 (argparse names the flag in its error)."""
    return _at_least(text, 0)


def _at_least(text: str, least: int) -> int:
    """`text` as an integer of at least `least`, or argparse's usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is below {least}")
    return value


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """Flags that change the experiment's training recipe (`zoo.train.recipes`); unset, they keep it."""
    g = p.add_argument_group("recipe", "change the experiment's training recipe (default: its values)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--warmup", type=non_negative, help="linear warm-up steps")
    g.add_argument(
        "--decay-steps",
        type=positive,
        help="step at which the cosine reaches its final learning rate, flat after (counted from step 0)",
    )
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay of kernels and token embeddings")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="Adam's betas")


def recipe_from_flags(args: argparse.Namespace, base: Recipe) -> Recipe:
    """`base` with the recipe flags given. A run resumed in a workdir whose config.json records a
    recipe keeps that recipe's warm-up and decay horizon unless --warmup or --decay-steps are
    given (a changed recipe, which the loop refuses to resume): a longer --steps then continues
    the schedule (flat at its final learning rate past the horizon) instead of stretching the
    cosine over the new total."""
    saved = epath.Path(args.workdir) / "config.json"
    kept = {}
    if saved.exists():
        schedule = json.loads(saved.read_text()).get("recipe", {})
        kept = {k: schedule[k] for k in ("warmup_steps", "decay_steps") if k in schedule}
        if kept and kept != {k: getattr(base, k) for k in kept}:
            print(
                f"resuming: the schedule keeps the warm-up and decay horizon of {saved}, {kept}; past the "
                f"horizon the learning rate stays at its final value"
            )
    flags = {
        "learning_rate": args.lr,
        "warmup_steps": args.warmup,
        "decay_steps": args.decay_steps,
        "weight_decay": args.weight_decay,
        "betas": None if args.betas is None else tuple(args.betas),
    }
    return dataclasses.replace(base, **{**kept, **{k: v for k, v in flags.items() if v is not None}})


def start(args: argparse.Namespace) -> Mesh:
    """Join the other processes (automatic on TPU VMs) and build the mesh of --mesh; quiet
    tfds's progress bars and absl's notices so the run's own progress stays readable."""
    absl.logging.set_verbosity(absl.logging.ERROR)
    tfds.disable_progress_bar()
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    return sharding.mesh_for(args.mesh)


def loop_config(args: argparse.Namespace) -> LoopConfig:
    """The loop settings given on the command line."""
    if args.batch % args.grad_accum:
        raise ValueError(f"--batch {args.batch} does not split into --grad-accum {args.grad_accum} micro-batches")
    return LoopConfig(
        steps=args.steps,
        seed=args.seed,
        log_every=args.log_every,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        accumulation_steps=args.grad_accum,
        max_bad_steps=args.max_bad_steps,
    )


def check_batch(args: argparse.Namespace, mesh: Mesh) -> None:
    """Refuse a global batch (--batch, and --eval-batch where given) that does not split over the
    processes and over the mesh's batch axes (data x fsdp)."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for flag, rows in (("--batch", args.batch), ("--eval-batch", getattr(args, "eval_batch", None))):
        if rows is not None and rows % math.lcm(batch_shards, jax.process_count()):
            raise ValueError(
                f"{flag} {rows} must be a multiple of data x fsdp = {batch_shards} and of the "
                f"{jax.process_count()} processes"
            )


def eval_batch(args: argparse.Namespace, mesh: Mesh, rows: int) -> int:
    """--eval-batch, or by default --batch capped at the validation split's `rows` rounded down to
    a multiple of the batch shards (data x fsdp, and the processes): a small split still
    evaluates. The training batch is no limit: evaluation keeps no activations for a backward."""
    if args.eval_batch is not None:
        return args.eval_batch
    unit = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    return min(args.batch, rows // unit * unit) or unit


# The language-model flags that fix the data a run trains on (and its held-out split): they form
# the config's "data" section, which a resumed run must keep (zoo.train.loop.FIXED_SECTIONS).
# --grad-accum, --mesh, --eval-batch(es) and the intervals may change: the same math, other hardware.
TEXT_DATA_FLAGS = (
    "tfds",
    "text_dir",
    "store",
    "eval_split",
    "tokenizer",
    "vocab_size",
    "max_documents",
    "batch",
    "seed",
)


def add_corpus_flags(p: argparse.ArgumentParser, *, vocab_size: int, data_dir: str = "runs/data") -> None:
    """Flags naming a corpus, its tokenizer, and the folder of its caches (tfds build, tokenizer, token store)."""
    p.add_argument("--tfds", metavar="NAME", help="a tfds text dataset by name, e.g. lm1b (downloads if needed)")
    p.add_argument(
        "--text-dir",
        type=epath.Path,
        help="text files: DIR/train/*.txt and DIR/<eval split>/*.txt, one document a file "
        "(default without --tfds: the shipped Shakespeare)",
    )
    p.add_argument("--eval-split", default="validation", help="held-out split name (default validation)")
    p.add_argument(
        "--tokenizer",
        type=epath.Path,
        help="a sentencepiece .model file, or a byte-level BPE (tokenizer.json, or a folder holding it or GPT-2's "
        "vocab.json and merges.txt), for any corpus (default: train a sentencepiece BPE on the training split)",
    )
    p.add_argument(
        "--vocab-size",
        type=positive,
        default=vocab_size,
        help=f"vocabulary of the trained tokenizer; the model's follows it (default {vocab_size})",
    )
    p.add_argument(
        "--max-documents",
        type=positive,
        help="read at most this many documents per split (the shipped corpus: plays, in name order)",
    )
    p.add_argument(
        "--data-dir",
        type=epath.Path,
        default=epath.Path(data_dir),
        help=f"cache of tfds builds, tokenizers and token stores, each keyed by what made it (default {data_dir})",
    )
    p.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="processes tokenizing the corpus into its token store, the first time (default 1)",
    )
    p.add_argument(
        "--store-dir",
        type=str,
        help="where token stores are written, local or gs:// (default DATA_DIR/token-stores)",
    )
    p.add_argument(
        "--store",
        type=str,
        help="a prepared token store's folder (local or gs://, as experiments/prepare_text.py printed it): "
        "train on it, its tokenizer included, without the corpus or its tfds build",
    )


def add_text_flags(p: argparse.ArgumentParser, *, vocab_size: int, data_dir: str = "runs/data") -> None:
    """Flags of the language-model experiments: where the text comes from, the tokenizer, sampling."""
    add_corpus_flags(p, vocab_size=vocab_size, data_dir=data_dir)
    p.add_argument(
        "--eval-batches",
        type=non_negative,
        default=20,
        help="validation batches per evaluation; 0: no evaluation (default 20)",
    )
    p.add_argument(
        "--eval-batch",
        type=positive,
        help="validation batch size in rows (default: --batch, capped at the validation split's "
        "rows rounded down to a multiple of data x fsdp)",
    )
    p.add_argument("--samples", type=int, default=2, help="texts sampled at the end (default 2)")
    p.add_argument("--sample-tokens", type=int, default=120, help="tokens per sample (default 120)")
    p.add_argument("--prompt", default="ROMEO.\n", help="the samples' prompt")


def run_language_model(args: argparse.Namespace, cfg: GPTConfig, recipe: str, **recipe_changes: Any) -> dict:
    """Train `cfg` (with --set overrides) on the text the flags name with the training recipe
    `recipe` (a `zoo.train.recipes` preset, with the experiment's `recipe_changes` and then the
    recipe flags), report validation loss and print samples."""
    mesh = start(args)
    check_batch(args, mesh)
    cfg = configs.override(cfg, args.set)
    corpus = _shared(lambda: corpus_from_flags(args, cfg.context_length))
    if not any(item.startswith("vocab_size=") for item in args.set):
        cfg = dataclasses.replace(cfg, vocab_size=corpus.tokenizer.vocab_size)
    corpus.tokenizer.check_vocab(cfg.vocab_size)
    print(
        f"corpus: {corpus.train.size:,} training and {corpus.validation.size:,} validation tokens "
        f"(vocabulary {corpus.tokenizer.vocab_size}); mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices"
    )
    model = GPT(cfg)
    task = tasks.language_model(
        model,
        corpus.train,
        corpus.validation,
        args.batch,
        args.seed,
        args.eval_batches,
        eval_batch(args, mesh, len(corpus.validation)),
    )
    base = recipes.recipe(recipe, batch=args.batch, steps=args.steps, context_length=cfg.context_length)
    chosen = recipe_from_flags(args, dataclasses.replace(base, **recipe_changes))
    if jax.process_index() == 0:  # zoo.load reads the run's tokenizer from its workdir
        epath.Path(args.workdir).mkdir(parents=True, exist_ok=True)
        write_atomically(epath.Path(args.workdir) / corpus.tokenizer.FILE_NAME, corpus.tokenizer.serialized())
    summary = _train(args, task, mesh, cfg, chosen, TEXT_DATA_FLAGS)
    if summary.get("preempted"):
        return summary
    if "eval_loss" in summary:
        print(
            f"step {args.steps}: validation loss {summary['eval_loss']:.3f} nats/token, "
            f"perplexity {math.exp(summary['eval_loss']):.1f}"
        )
    if args.samples:
        prompt = corpus.tokenizer.encode(args.prompt)
        with sharding.sharding_context(mesh):  # params stay in their shards
            new = jax.device_get(
                generate(
                    model,
                    summary["state"]["params"],
                    [prompt] * args.samples,
                    args.sample_tokens,
                    temperature=0.8,
                    rng=jax.random.key(args.seed),
                )
            )
        if jax.process_index() == 0:
            for i, tokens in enumerate(new):
                print(f"\n--- sample {i + 1} ---\n{corpus.tokenizer.decode([*prompt, *tokens.tolist()])}")
    return summary


def _train(
    args: argparse.Namespace, task: Task, mesh: Mesh, cfg: Any, recipe: Recipe, data_flags: tuple[str, ...]
) -> dict:
    """Train `task` with `recipe` on `mesh` in --workdir; config.json records the model, the recipe,
    the flags in `data_flags` (the "data" section a resume must keep) and the whole command line."""
    config = {
        "model": dataclasses.asdict(cfg),
        "recipe": dataclasses.asdict(recipe),
        "data": {flag: value for flag, value in vars(args).items() if flag in data_flags},
        "args": vars(args),
    }
    return train(task, recipes.optimizer(recipe), mesh, args.workdir, loop_config(args), config)


def corpus_from_flags(args: argparse.Namespace, length: int, host: int = 0, hosts: int = 1) -> PackedCorpus | None:
    """The corpus `add_corpus_flags`' flags name: a prepared token store (--store), or a corpus
    tokenized into one (with hosts > 1, this host's share of it: None)."""
    if args.store:
        return open_corpus(args.store, length, args.eval_split, args.max_documents)
    return prepare_corpus(
        args.data_dir,
        length,
        args.vocab_size,
        tfds_name=args.tfds,
        text_dir=args.text_dir,
        eval_split=args.eval_split,
        tokenizer_path=args.tokenizer,
        max_documents=args.max_documents,
        workers=args.workers,
        host=host,
        hosts=hosts,
        store_dir=args.store_dir,
    )


def _shared(prepare: Callable[[], Any]) -> Any:
    """Run `prepare` on process 0 first (it fills the shared caches), then on the others."""
    if jax.process_index() == 0:
        result = prepare()
    multihost_utils.sync_global_devices("data prepared")
    return result if jax.process_index() == 0 else prepare()


@dataclasses.dataclass(frozen=True)
class ImageData:
    """An image experiment's data: `examples(cfg, split)` reads a split sized for the model `cfg`;
    pixels are normalised by `mean` and `std` per channel; training images are shifted by up to
    `pad` pixels and flipped at random; `eval_batch` rows per evaluation batch (None: --batch)."""

    examples: Callable[[ViTConfig, str], ArrayExamples | SourceExamples]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    eval_split: str = "validation"
    eval_batch: int | None = None

    def pipeline(
        self, examples: ArrayExamples | SourceExamples, batch: int, cfg: ViTConfig, seed: int, training: bool
    ) -> ImagePipeline:
        """This process's batches of `examples`: shuffled and augmented for training, in order for evaluation."""
        return ImagePipeline(
            examples,
            batch,
            seed,
            cfg.image_size,
            cfg.num_channels,
            self.mean,
            self.std,
            jax.process_index(),
            jax.process_count(),
            augment=training,
            pad=self.pad,
            shuffle=training,
        )


# The image-classifier flags that fix the data a run trains on: the config's "data" section.
IMAGE_DATA_FLAGS = ("data", "synthetic", "mock", "batch", "seed")


def run_image_classifier(args: argparse.Namespace, cfg: ViTConfig, recipe: Recipe, data: ImageData) -> dict:
    """Train `cfg` (with --set overrides) on `data` with `recipe` (then the recipe flags) and
    report the accuracy on its evaluation split."""
    mesh = start(args)
    check_batch(args, mesh)
    cfg = configs.override(cfg, args.set)
    train_data = _shared(lambda: data.examples(cfg, "train"))
    eval_data = data.examples(cfg, data.eval_split)
    print(
        f"{len(train_data):,} training and {len(eval_data):,} {data.eval_split} images; mesh "
        f"{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices"
    )
    evaluate = data.pipeline(eval_data, data.eval_batch or args.batch, cfg, args.seed, training=False)
    task = tasks.image_classifier(
        ViT(cfg), data.pipeline(train_data, args.batch, cfg, args.seed, training=True), evaluate
    )
    chosen = recipe_from_flags(args, recipe)
    summary = _train(args, task, mesh, cfg, chosen, IMAGE_DATA_FLAGS)
    if "eval_accuracy" in summary and not summary.get("preempted"):
        print(
            f"step {args.steps}: {data.eval_split} accuracy {summary['eval_accuracy']:.2%} on "
            f"{evaluate.steps_per_epoch * evaluate.global_batch:,} images (loss {summary['eval_loss']:.3f})"
        )
    return summary
