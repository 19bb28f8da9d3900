"""GPT-1's recipe on the shipped corpus: generative pretraining, then supervised fine-tuning on tasks
with true labels, each input framed by start, delimiter and extract tokens and a linear head on the
extract token's state (Radford et al., 2018). A table of test accuracy per task and setting:

    scratch      no pretraining: the whole model learns the task (loss: task + λ · LM)
    full         pretrained, every weight fine-tuned, task + λ · LM (λ = --lm-weight, GPT-1's 0.5)
    full_no_lm   pretrained, every weight fine-tuned, the task loss alone (λ = 0)
    probe        pretrained and frozen: only the linear head learns
    lora:R       pretrained and frozen, LoRA adapters of rank R on attention and MLP, and the head
    prompt:P     pretrained and frozen, P learned prompt vectors before every sequence, and the head

    python experiments/gpt1_finetune.py                                 # pretrains the quickstart's model first
    python experiments/gpt1_finetune.py --init-from runs/default --tasks genre --settings full lora:4 lora:16

The tasks (zoo.data.labelled) come from the shipped plays and poems, test splits from held-out works:
genre of a passage, same-work similarity of two passages, "<speaker> says this" entailment, and the
next line among four. --tfds adds GLUE-style tasks by tfds name (e.g. glue/sst2) where prepared.
Each fine-tune runs in its own <workdir>/<task>/<setting>; rerunning resumes or reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any

import default  # experiments/default.py, beside this file
import flax.linen as nn
import jax
import numpy as np
from etils import epath

import zoo
from zoo import adaptation, experiment, tasks
from zoo.adaptation import finetune, lora, prompt
from zoo.data import labelled
from zoo.report import fmt, markdown_table
from zoo.runs import Run, load_transformers
from zoo.train import Task, recipes, train

TASKS = ("genre", "same_play", "speaker", "next_line")
SETTINGS = ("scratch", "full", "full_no_lm", "probe")
LORA_TARGETS = r"attn/(qkv|out)|mlp/(up|down)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (of `argv`, default the command line), with this experiment's defaults."""
    p = experiment.parser(__doc__, workdir="runs/gpt1_finetune", steps=300, batch=16, checkpoint_every=0)
    p.add_argument("--init-from", type=epath.Path, help="a trained run (default: pretrain in <workdir>/pretrained)")
    p.add_argument("--from-transformers", metavar="DIR", help="or a GPT-2 save_pretrained folder with its tokenizer")
    p.add_argument("--pretrain-steps", type=int, default=600, help="steps of that pretraining (default 600)")
    p.add_argument("--data-dir", default="runs/data", help="the pretraining corpus's caches (default runs/data)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"tasks by name (default {' '.join(TASKS)})")
    p.add_argument("--tfds", nargs="*", default=[], metavar="NAME", help="also tfds tasks, e.g. glue/sst2")
    p.add_argument("--settings", nargs="+", default=[*SETTINGS, "lora:4"], help="see above (default: all, lora:4)")
    p.add_argument("--lm-weight", type=float, default=0.5, help="λ of the auxiliary LM loss (default 0.5)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA's alpha: scale alpha / rank (default 16)")
    p.add_argument("--length", type=int, default=64, help="tokens per sequence, cut by the rule (default 64)")
    p.add_argument("--lora-targets", default=LORA_TARGETS, help=f"kernels LoRA adapts (default {LORA_TARGETS})")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the tasks' sizes (default 1)")
    p.add_argument("--json", type=pathlib.Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for setting in args.settings:
        kind, _, size = setting.partition(":")
        if setting not in SETTINGS and not (kind in ("lora", "prompt") and size.isdigit()):
            p.error(f"unknown setting {setting!r}: one of {', '.join(SETTINGS)}, lora:RANK or prompt:LENGTH")
    return args


def pretrained(args: argparse.Namespace, mesh: jax.sharding.Mesh) -> Run:
    """The run to fine-tune: --from-transformers, --init-from, or the quickstart's model pretrained in
    <workdir>/pretrained."""
    if args.from_transformers:
        args.init_from = args.from_transformers
        return load_transformers(args.from_transformers, mesh)
    if args.init_from is None:
        args.init_from = epath.Path(args.workdir) / "pretrained"
        flags = ["--workdir", str(args.init_from), "--steps", str(args.pretrain_steps), "--samples", "0"]
        default.train(default.parse_args([*flags, "--data-dir", str(args.data_dir), "--mesh", args.mesh]))
    return zoo.load(args.init_from, mesh)


def adapt(task: Task, setting: str, params: Any, args: argparse.Namespace) -> tuple[Task, Any]:
    """The task trained in `setting`, starting from the pretrained `params` (GPT weights), and the
    tree of what trains."""
    key = jax.random.key(args.seed)
    init = lambda k: task.model.init(k, task.example_input)["params"]
    shapes = nn.unbox(jax.eval_shape(init, key))
    head, everything = adaptation.where(shapes, r"^head/"), jax.tree.map(lambda _: True, shapes)
    pretrained = lambda fresh: {**fresh, "gpt": params}  # a fresh head on the pretrained GPT
    if setting == "scratch":
        return task, everything
    if setting in ("full", "full_no_lm", "probe"):
        return dataclasses.replace(task, start_params=pretrained), head if setting == "probe" else everything
    kind, size = setting.split(":")
    if kind == "prompt":  # the prompt starts as rows of the pretrained vocabulary
        start = lambda fresh: {"base": pretrained(fresh["base"]), "prompt": prompt.init(params, key, int(size))}

        def with_prompt(k: jax.Array) -> dict:
            base = init(k)
            return {"base": base, "prompt": prompt.init(base["gpt"], k, int(size))}

        adapted = dataclasses.replace(
            task, loss_fn=prompt.loss(task.loss_fn), init_params=with_prompt, start_params=start
        )
        return adapted, {"base": head, "prompt": True}
    rank = int(size)

    def with_adapters(k: jax.Array) -> dict:
        base = init(k)
        return {"base": base, "lora": lora.init(base, k, rank, args.lora_alpha, args.lora_targets)}

    adapters = nn.unbox(jax.eval_shape(with_adapters, key)["lora"])
    adapted = dataclasses.replace(
        task,
        loss_fn=lora.loss(task.loss_fn),
        init_params=with_adapters,
        start_params=lambda fresh: {"base": pretrained(fresh["base"]), "lora": fresh["lora"]},
    )
    return adapted, {"base": head, "lora": lora.trainable(adapters)}


def fine_tune(
    args: argparse.Namespace, mesh: jax.sharding.Mesh, run: Run, name: str, data: labelled.LabelledTask, setting: str
) -> dict:
    """Fine-tune `run` on `data` in `setting`: its test accuracy, trainable parameters, optimizer bytes."""
    rng, multiple = jax.random.key(args.seed), mesh.shape["tensor"]  # the vocabulary splits over tensor
    cfg, params, tokenizer = finetune.add_special_tokens(run.model.cfg, run.params, run.tokenizer, rng, multiple)
    train_set, _ = finetune.encode(data.kind, data.train, tokenizer, args.length)
    test_set, cut = finetune.encode(data.kind, data.test, tokenizer, args.length)
    model = finetune.Classifier(cfg, data.kind, len(data.classes))
    lm_weight = 0.0 if setting in ("full_no_lm", "probe") else args.lm_weight
    task = tasks.text_classifier(model, train_set, test_set, args.batch, args.seed, lm_weight, eval_batches=0)
    task, trainable = adapt(task, setting, params, args)
    task = dataclasses.replace(task, loss_fn=adaptation.frozen(task.loss_fn, trainable))
    base = recipes.Recipe(5e-4, args.steps // 10, args.steps, 0.0, 0.01, (0.9, 0.999))
    recipe = experiment.recipe_from_flags(args, base)
    optimizer = adaptation.train_only(recipes.optimizer(recipe), trainable)
    data_config = {"task": name, "setting": setting, "lm_weight": lm_weight, "length": args.length}
    config = {
        "model": dataclasses.asdict(cfg),
        "recipe": dataclasses.asdict(recipe),
        "data": {**data_config, "scale": args.scale, "seed": args.seed, "init_from": str(args.init_from)},
        "args": vars(args),
    }
    workdir = epath.Path(args.workdir) / name / setting.replace(":", "_")
    state = train(task, optimizer, mesh, workdir, experiment.loop_config(args), config)["state"]
    weights, prefix = state["params"], None
    if setting.startswith("lora:"):
        weights = lora.merge(weights["base"], weights["lora"])
        lora.save(workdir / "adapters", state["params"]["lora"])  # a small file, to share or load alone
    if setting.startswith("prompt:"):
        weights, prefix = weights["base"], weights["prompt"]
    predicted = finetune.predict(model, weights, test_set, prefix=prefix)
    accuracy = float(np.mean(predicted == test_set["label"]))
    trained = [leaf for leaf, t in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(trainable)) if t]
    return {
        "task": name,
        "setting": setting,
        "accuracy": accuracy,
        "test": len(test_set["label"]),
        "test_cut": cut,
        "trainable": lora.count(trained),
        "optimizer_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(state["opt_state"])),
    }


def mib(row: dict) -> str:
    return fmt(row["optimizer_bytes"] / 2**20, 3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mesh = experiment.start(args)
    experiment.check_batch(args, mesh)
    run = pretrained(args, mesh)
    everything = labelled.shakespeare_tasks(args.seed, args.scale)
    chosen = {name: everything[name] for name in args.tasks} | {name: labelled.tfds_task(name) for name in args.tfds}
    rows = []
    for name, data in chosen.items():
        for setting in args.settings:
            rows.append(fine_tune(args, mesh, run, name, data, setting))
            print(f"{name} {setting}: test accuracy {rows[-1]['accuracy']:.3f}", flush=True)
    print(f"\n## Test accuracy, {args.steps} steps of {args.batch} (from {args.init_from}, step {run.step})\n")
    header = ["task", "setting", "accuracy", "test examples", "trainable params", "optimizer MiB"]
    cells = [
        [r["task"], r["setting"], fmt(r["accuracy"], 3), str(r["test"]), f"{r['trainable']:,}", mib(r)] for r in rows
    ]
    print(markdown_table(header, cells, left=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
