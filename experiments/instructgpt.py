"""InstructGPT's pipeline on the shipped corpus (Ouyang et al., 2022), with preferences that are
facts computed by code (`zoo.data.instructions`: "Reply in at most 4 words.", "Include the word
'love'.", "What is 14 + 37?", "End with a question."), so every stage is checked against the truth:

    pretrained   the quickstart's GPT (or --init-from RUN)
    sft          supervised fine-tuning on demonstrations in the chat format (loss on the replies)
    rm           a reward model on K sampled replies per prompt ranked by their true scores
    ppo          PPO against the reward model, KL penalty β to the SFT policy
    ppo_ptx      the same plus γ times the pretraining loss (PPO-ptx)
    ppo_rule     the sanity run: PPO against the true score itself, no reward model

    python experiments/instructgpt.py                            # pretrains the quickstart's model first
    python experiments/instructgpt.py --init-from runs/default --ppo ppo ppo_ptx --steps 100

Each stage trains in <workdir>/<stage> with the shared loop (rerunning resumes or reuses it).
Printed: the reward model's pairwise accuracy on held-out comparisons; for SFT and each PPO run,
the true score of greedy replies to held-out instructions (by kind) and the held-out pretraining
loss. ppo.png plots, per PPO iteration, the learned reward, the true score, the KL to SFT and the
held-out pretraining loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any

import gpt1_finetune  # experiments/gpt1_finetune.py, beside this file: the pretrained run
import jax
import numpy as np
from etils import epath

import zoo
from zoo import experiment, tasks
from zoo.alignment import chat, ppo, reward
from zoo.data import instructions
from zoo.data.shakespeare import VALIDATION_PLAYS, works
from zoo.data.text import packed_rows
from zoo.report import fmt, markdown_table
from zoo.runs import Run
from zoo.tokenizer import WithSpecialTokens
from zoo.train import Task, next_token_loss, recipes, train

PPO_RUNS = ("ppo", "ppo_ptx", "ppo_rule")
PROMPT_TOKENS = 24  # the longest chat prompt (the instructions are short)
_next_token_loss = jax.jit(next_token_loss, static_argnums=0)  # one compile per model, however often called


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (of `argv`, default the command line), with this experiment's defaults."""
    p = experiment.parser(__doc__, workdir="runs/instructgpt", steps=60, batch=32, log_every=5, checkpoint_every=0)
    p.add_argument("--init-from", type=epath.Path, help="a trained run (default: pretrain in <workdir>/pretrained)")
    p.add_argument("--pretrain-steps", type=int, default=600, help="steps of that pretraining (default 600)")
    p.add_argument("--data-dir", default="runs/data", help="the pretraining corpus's caches (default runs/data)")
    p.add_argument("--sft-steps", type=int, default=300, help="supervised fine-tuning steps (default 300)")
    p.add_argument("--rm-steps", type=int, default=300, help="reward-model steps (default 300)")
    p.add_argument("--prompts", type=int, default=2000, help="training instructions (default 2000)")
    p.add_argument("--test-prompts", type=int, default=200, help="held-out instructions (default 200)")
    p.add_argument("--rm-prompts", type=int, default=600, help="prompts whose replies the RM ranks (default 600)")
    p.add_argument("--k", type=int, default=4, help="replies ranked per prompt (default 4)")
    p.add_argument("--ppo", nargs="*", default=list(PPO_RUNS), choices=PPO_RUNS, help="PPO runs (default all)")
    p.add_argument("--kl-coef", type=float, default=0.2, help="β, the KL penalty per token (default 0.2)")
    p.add_argument("--ptx-coef", type=float, default=1.0, help="γ of ppo_ptx's pretraining loss (default 1)")
    p.add_argument("--response-tokens", type=int, default=24, help="the longest reply (default 24)")
    p.add_argument("--ppo-lr", type=float, default=1e-4, help="PPO's learning rate (default 1e-4)")
    p.add_argument("--json", type=pathlib.Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.from_transformers = None  # gpt1_finetune.pretrained's other source
    return args


def conversations(items: list[instructions.Instruction], seed: int) -> list[list[chat.Message]]:
    """Each instruction as a user message answered by its demonstration."""
    return [
        [("user", item.text), ("assistant", instructions.demonstration(item, seed + i))] for i, item in enumerate(items)
    ]


def stage_config(
    cfg: zoo.GPTConfig, recipe: recipes.Recipe, tokenizer: WithSpecialTokens, args: argparse.Namespace, **data: Any
) -> dict:
    """A stage's config.json: the model (with the chat tokens, so `zoo.load` reads it), the recipe, the data."""
    return {
        "model": dataclasses.asdict(cfg),
        "recipe": dataclasses.asdict(recipe),
        "data": {"init_from": str(args.init_from), "prompts": args.prompts, "seed": args.seed, **data},
        "special_tokens": chat.special_tokens(tokenizer),
        "args": vars(args),
    }


def fine_tune(args: argparse.Namespace, mesh: jax.sharding.Mesh, run: Run, train_set: list, test_set: list) -> dict:
    """The SFT stage: the chat tokens added to the pretrained model, trained on the demonstrations."""
    rng, multiple = jax.random.key(args.seed), mesh.shape["tensor"]
    cfg, params, tokenizer = chat.add_chat_tokens(run.model.cfg, run.params, run.tokenizer, rng, multiple)
    train_batch, _ = chat.encode(conversations(train_set, args.seed), tokenizer, 64)
    test_batch, _ = chat.encode(conversations(test_set, args.seed), tokenizer, 64)
    task = tasks.supervised_chat(zoo.GPT(cfg), train_batch, test_batch, args.batch, args.seed)
    task = dataclasses.replace(task, start_params=lambda fresh: params)
    recipe = recipes.Recipe(1e-3, args.sft_steps // 10, args.sft_steps, 0.1, 0.0, (0.9, 0.95))
    return stage(args, mesh, "sft", task, recipe, tokenizer, args.sft_steps, stage_config(cfg, recipe, tokenizer, args))


def stage(
    args: argparse.Namespace,
    mesh: jax.sharding.Mesh,
    name: str,
    task: Task,
    recipe: recipes.Recipe,
    tokenizer: WithSpecialTokens,
    steps: int,
    config: dict,
    **loop_changes: Any,
) -> dict:
    """Train `task` as the stage `name` in <workdir>/<name> (a finished stage is reused)."""
    workdir = epath.Path(args.workdir) / name
    if jax.process_index() == 0:  # zoo.load reads the tokenizer beside the checkpoints
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / tokenizer.FILE_NAME).write_bytes(tokenizer.serialized())
    loop = dataclasses.replace(experiment.loop_config(args), steps=steps, **loop_changes)
    print(f"\n== {name}: {steps} steps in {workdir}", flush=True)
    return train(task, recipes.optimizer(recipe), mesh, workdir, loop, config)


def replies(
    run: Run, params: Any, items: list, samples: int, key: jax.Array, max_new: int
) -> tuple[list, list, np.ndarray]:
    """(prompts' tokens, `samples` replies per prompt sampled at temperature 1 with their end tokens,
    their true scores [N, K])."""
    prompts = [chat.prompt([("user", item.text)], run.tokenizer) for item in items]
    end = run.tokenizer.end
    new = zoo.generate(
        run.model, params, prompts, max_new, temperature=1.0, stop_tokens=(end,), rng=key, samples=samples
    )
    cut = [row[: row.index(end) + 1] if end in row else row for row in np.asarray(new).tolist()]
    texts = [chat.response_text(row, run.tokenizer) for row in cut]
    scores = [instructions.score(items[i // samples], text) for i, text in enumerate(texts)]
    return prompts, [cut[i : i + samples] for i in range(0, len(cut), samples)], np.reshape(scores, (-1, samples))


def true_scores(
    run: Run, params: Any, items: list, max_new: int, key: jax.Array, samples: int
) -> dict[str, dict[str, float]]:
    """The mean true score of replies to `items`, per kind and in all: greedy, and sampled at
    temperature 1 (`samples` per prompt) as the PPO rollouts are."""
    greedy = chat.reply(run.model, params, run.tokenizer, [[("user", item.text)] for item in items], max_new)
    found = {
        "greedy": np.array([instructions.score(item, text) for item, text in zip(items, greedy)]),
        "sampled": replies(run, params, items, samples, key, max_new)[2].mean(axis=1),
    }
    kinds = np.array([item.kind for item in items])
    return {
        way: {**{kind: float(scores[kinds == kind].mean()) for kind in instructions.KINDS}, "all": float(scores.mean())}
        for way, scores in found.items()
    }


def held_out_loss(model: zoo.GPT, params: Any, rows: np.ndarray) -> float:
    """The next-token loss of `params` on held-out pretraining rows."""
    return float(_next_token_loss(model, params, rows))


def reward_stage(args: argparse.Namespace, mesh: jax.sharding.Mesh, sft: Run, train_set: list, test_set: list) -> tuple:
    """The RM stage: K replies sampled from the SFT model per prompt, ranked by their true scores;
    the model starts from the SFT weights. Returns its params and held-out pairwise accuracy."""
    key, length = jax.random.key(args.seed), PROMPT_TOKENS + args.response_tokens
    train_cmp = reward.encode(
        *replies(sft, sft.params, train_set[: args.rm_prompts], args.k, key, args.response_tokens), length
    )
    test_cmp = reward.encode(*replies(sft, sft.params, test_set, args.k, key, args.response_tokens), length)
    model = reward.RewardModel(sft.model.cfg)
    # held-out accuracy is computed below, on every pair at once (and for a reused stage too)
    task = tasks.reward_model(model, train_cmp, test_cmp, args.batch // args.k or 1, args.seed, eval_batches=0)
    task = dataclasses.replace(task, start_params=lambda fresh: {**fresh, "gpt": sft.params})
    recipe = recipes.Recipe(3e-4, args.rm_steps // 10, args.rm_steps, 0.1, 0.0, (0.9, 0.95))
    config = stage_config(model.cfg, recipe, sft.tokenizer, args)
    params = stage(args, mesh, "rm", task, recipe, sft.tokenizer, args.rm_steps, config)["state"]["params"]
    _, accuracy = jax.jit(reward.loss, static_argnums=0)(model, params, test_cmp)
    truth = test_cmp["score"]
    pairs = int(np.sum(truth[:, :, None] > truth[:, None, :]))
    print(f"reward model: pairwise accuracy {float(accuracy):.3f} on {pairs} held-out comparisons")
    return params, {"held_out_pair_accuracy": float(accuracy), "held_out_pairs": pairs}


def ppo_stage(
    args: argparse.Namespace,
    mesh: jax.sharding.Mesh,
    name: str,
    sft: Run,
    rm: Any,
    train_set: list,
    pretraining: np.ndarray,
    held_out: np.ndarray,
) -> Any:
    """One PPO run (`name` in PPO_RUNS) from the SFT policy; returns the trained policy's params."""
    config = ppo.PPOConfig(
        kl_coef=args.kl_coef,
        ptx_coef=args.ptx_coef if name == "ppo_ptx" else 0.0,
        response_tokens=args.response_tokens,
        reward="rule" if name == "ppo_rule" else "model",
    )
    prompts = chat.padded_prompts([[("user", item.text)] for item in train_set], sft.tokenizer, PROMPT_TOKENS)
    prompts["instruction"] = np.arange(len(train_set), dtype=np.int32)

    def true_score(index: np.ndarray, response: np.ndarray) -> np.ndarray:
        texts = [chat.response_text(row, sft.tokenizer) for row in np.asarray(response).tolist()]
        return np.array([instructions.score(train_set[i], t) for i, t in zip(np.asarray(index), texts)], np.float32)

    def start(
        fresh: dict,
    ) -> dict:  # the value model starts as the RM (InstructGPT), or as the SFT trunk and a new head
        return {"policy": sft.params, "value": rm or {**fresh["value"], "gpt": sft.params}}

    constants = {"reference": sft.params, **({"reward": rm} if config.reward == "model" else {})}
    task = tasks.proximal_policy(
        sft.model, config, prompts, pretraining, held_out, args.batch, args.seed, constants, start, sft.tokenizer.end,
        true_score,
    )  # fmt: skip
    base = recipes.Recipe(args.ppo_lr, args.steps // 10, args.steps, 1.0, 0.0, (0.9, 0.95))
    recipe = experiment.recipe_from_flags(args, base)
    cfg = stage_config(sft.model.cfg, recipe, sft.tokenizer, args, ppo=dataclasses.asdict(config))
    cfg["params_key"] = "policy"  # zoo.load (and chat.py) read the policy alone
    every = max(args.steps // 6, 1)
    summary = stage(args, mesh, name, task, recipe, sft.tokenizer, args.steps, cfg, eval_every=every)
    return summary["state"]["params"]["policy"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mesh = experiment.start(args)
    experiment.check_batch(args, mesh)
    base = gpt1_finetune.pretrained(args, mesh)
    train_set = instructions.instructions(args.prompts, args.seed, "train")
    test_set = instructions.instructions(args.test_prompts, args.seed, "test")
    fine_tune(args, mesh, base, train_set, test_set)
    sft = zoo.load(epath.Path(args.workdir) / "sft", mesh)
    length = sft.model.cfg.context_length
    held_out = packed_rows(sft.tokenizer, [works()[name] for name in VALIDATION_PLAYS], length)[: 8 * args.batch]
    training_works = [text for name, text in sorted(works().items()) if name not in VALIDATION_PLAYS]
    pretraining = packed_rows(sft.tokenizer, training_works, length)

    def evaluated(model: zoo.GPT, params: Any, chats: bool = True) -> dict:
        found = {"held_out_loss": held_out_loss(model, params, held_out)}
        if chats:  # the same sampling key for every model: their scores are paired
            key = jax.random.key(args.seed + 1)
            found["true_score"] = true_scores(sft, params, test_set, args.response_tokens, key, args.k)
        return found

    results = {"pretrained": evaluated(base.model, base.params, chats=False), "sft": evaluated(sft.model, sft.params)}
    rm = None
    if set(args.ppo) - {"ppo_rule"}:
        rm, results["rm"] = reward_stage(args, mesh, sft, train_set, test_set)
    for name in args.ppo:
        results[name] = evaluated(sft.model, ppo_stage(args, mesh, name, sft, rm, train_set, pretraining, held_out))
    report(args, results)


def report(args: argparse.Namespace, results: dict) -> None:
    """The tables of true scores and held-out losses, and ppo.png from the PPO runs' metrics."""
    kinds = [*instructions.KINDS, "all"]
    for way in ("greedy", "sampled"):
        rows = [
            [name, *(fmt(r["true_score"][way][k], 3) for k in kinds), fmt(r["held_out_loss"], 3)]
            for name, r in results.items()
            if "true_score" in r
        ]
        print(f"\n## True scores of {way} replies to {args.test_prompts} held-out instructions\n")
        print(markdown_table(["model", *kinds, "held-out LM loss"], rows, left=1))
    print(f"\npretrained model: held-out LM loss {results['pretrained']['held_out_loss']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    plot(epath.Path(args.workdir), args.ppo)


def plot(workdir: epath.Path, runs: list[str]) -> None:
    """ppo.png: each PPO run's learned reward, true score, KL to SFT and held-out pretraining loss by iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward_model_score", "learned reward"),
        ("true_score", "true score"),
        ("kl", "KL to SFT (nats)"),
        ("eval_loss", "held-out LM loss"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for name in runs:
        records = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        for ax, (key, title) in zip(axes, panels):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
            ax.set_title(title)
            ax.set_xlabel("PPO iteration")
    axes[1].legend()  # every run has a true score
    fig.tight_layout()
    fig.savefig(workdir / "ppo.png", dpi=100)
    print(f"plot: {workdir / 'ppo.png'}")


if __name__ == "__main__":
    main()
