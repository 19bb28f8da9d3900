"""What experiment files share: the common flags, multi-host start-up, the mesh, and the
language-model run (text in, trained model, validation loss and samples out)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import absl.logging
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from zoo import configs, sharding, tasks
from zoo.data.text import prepare_corpus
from zoo.models.gpt import GPT, GPTConfig
from zoo.sampling import sample
from zoo.train.loop import LoopConfig, train
from zoo.train.steps import adamw


def parser(doc: str, *, workdir: str, steps: int, batch: int, log_every: int = 50, checkpoint_every: int = 500,
           mesh: str = "data=-1", parents: tuple[argparse.ArgumentParser, ...] = ()) -> argparse.ArgumentParser:
    """An argument parser with the flags every experiment takes; the experiment adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=list(parents))
    p.add_argument("--workdir", type=epath.Path, default=epath.Path(workdir),
                   help=f"checkpoints, metrics and config, a folder or a URL such as gs://bucket/run (every "
                        f"host of a pod needs the same one); rerunning in the same workdir resumes (default {workdir})")
    p.add_argument("--mesh", default=mesh,
                   help=f"a layout {tuple(sharding.LAYOUTS)} or a mesh such as data=2,fsdp=2,tensor=2 "
                        f"(-1 takes the remaining devices; default {mesh})")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    p.add_argument("--batch", type=int, default=batch, help=f"global batch size in rows (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set num_layers=6 (repeatable)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step: the batch is split k ways (default 1)")
    p.add_argument("--log-every", type=int, default=log_every, help=f"steps between metrics (default {log_every})")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default 0: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"steps between checkpoints (default {checkpoint_every})")
    p.add_argument("--coordinator-address", help="host:port of process 0, for multi-process runs off TPU")
    p.add_argument("--num-processes", type=int, help="number of processes (with --coordinator-address)")
    p.add_argument("--process-id", type=int, help="this process's index (with --coordinator-address)")
    return p


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
    return LoopConfig(steps=args.steps, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, accumulation_steps=args.grad_accum)


def check_batch(args: argparse.Namespace, mesh: Mesh) -> None:
    """Refuse a global batch that does not split over the processes and over the mesh's batch
    axes (data x fsdp)."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % batch_shards or args.batch % jax.process_count():
        raise ValueError(
            f"--batch {args.batch} must be a multiple of data x fsdp = {batch_shards} and of the "
            f"{jax.process_count()} processes"
        )


def add_text_flags(p: argparse.ArgumentParser, *, vocab_size: int, data_dir: str = "runs/data") -> None:
    """Flags of the language-model experiments: where the text comes from, the tokenizer, sampling."""
    p.add_argument("--tfds", metavar="NAME", help="a tfds text dataset by name, e.g. lm1b (downloads if needed)")
    p.add_argument("--text-dir", type=epath.Path,
                   help="text files: DIR/train/*.txt and DIR/<eval split>/*.txt, one document a file "
                        "(default without --tfds: the shipped Shakespeare)")
    p.add_argument("--eval-split", default="validation", help="held-out split name (default validation)")
    p.add_argument("--tokenizer", type=epath.Path, help="a sentencepiece model (default: train one on the data)")
    p.add_argument("--vocab-size", type=int, default=vocab_size,
                   help=f"vocabulary of the trained tokenizer; the model's follows it (default {vocab_size})")
    p.add_argument("--max-documents", type=int, help="read at most this many documents per split")
    p.add_argument("--data-dir", type=epath.Path, default=epath.Path(data_dir),
                   help=f"cache of tfds builds and tokenizers (default {data_dir})")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the experiment's)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: the experiment's)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (default 20)")
    p.add_argument("--samples", type=int, default=2, help="texts sampled at the end (default 2)")
    p.add_argument("--sample-tokens", type=int, default=120, help="tokens per sample (default 120)")
    p.add_argument("--prompt", default="ROMEO.\n", help="the samples' prompt")


def run_language_model(args: argparse.Namespace, cfg: GPTConfig, learning_rate: float, warmup: int) -> dict:
    """Train `cfg` (with --set overrides) on the text the flags name, report validation loss
    and print samples; --lr and --warmup override the experiment's defaults."""
    mesh = start(args)
    check_batch(args, mesh)
    cfg = configs.override(cfg, args.set)
    corpus = _shared(lambda: prepare_corpus(
        args.data_dir, cfg.context_length, args.vocab_size, tfds_name=args.tfds, text_dir=args.text_dir,
        eval_split=args.eval_split, tokenizer_path=args.tokenizer, max_documents=args.max_documents))
    if not any(item.startswith("vocab_size=") for item in args.set):
        cfg = dataclasses.replace(cfg, vocab_size=corpus.tokenizer.vocab_size)
    corpus.tokenizer.check_vocab(cfg.vocab_size)
    print(f"corpus: {corpus.train.size:,} training and {corpus.validation.size:,} validation tokens "
          f"(vocabulary {corpus.tokenizer.vocab_size}); mesh {dict(mesh.shape)} over {jax.device_count()} "
          f"{jax.devices()[0].platform} devices")
    model = GPT(cfg)
    task = tasks.language_model(model, corpus.train, corpus.validation, args.batch, args.seed, args.eval_batches)
    optimizer = adamw(args.lr or learning_rate, args.steps, warmup if args.warmup is None else args.warmup)
    summary = train(task, optimizer, mesh, args.workdir, loop_config(args),
                    {"model": dataclasses.asdict(cfg), "args": vars(args)})
    if summary.get("preempted"):
        return summary
    print(f"step {args.steps}: validation loss {summary['eval_loss']:.3f} nats/token, "
          f"perplexity {math.exp(summary['eval_loss']):.1f}")
    if args.samples:
        prompt = np.asarray([corpus.tokenizer.encode(args.prompt)] * args.samples, np.int32)
        with sharding.sharding_context(mesh):  # params stay in their shards; kernels see the mesh
            texts = jax.device_get(sample(model, summary["state"]["params"], prompt, args.sample_tokens,
                                          jax.random.key(args.seed), temperature=0.8))
        if jax.process_index() == 0:
            for i, tokens in enumerate(texts):
                print(f"\n--- sample {i + 1} ---\n{corpus.tokenizer.decode(tokens.tolist())}")
    return summary


def _shared(prepare: Callable[[], Any]) -> Any:
    """Run `prepare` on process 0 first (it fills the shared caches), then on the others."""
    if jax.process_index() == 0:
        result = prepare()
    multihost_utils.sync_global_devices("data prepared")
    return result if jax.process_index() == 0 else prepare()
