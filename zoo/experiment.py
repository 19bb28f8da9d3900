"""What every experiment file shares: the common flags, multi-host start-up and the mesh."""

from __future__ import annotations

import argparse
import pathlib

import jax
from jax.sharding import Mesh

from zoo import sharding
from zoo.train.loop import LoopConfig


def parser(doc: str, *, workdir: str, steps: int, batch: int, log_every: int = 50,
           checkpoint_every: int = 500) -> argparse.ArgumentParser:
    """An argument parser with the flags every experiment takes; the experiment adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(workdir),
                   help=f"checkpoints, metrics and config; rerunning in the same workdir resumes (default {workdir})")
    p.add_argument("--mesh", default="data=-1",
                   help=f"a layout {tuple(sharding.LAYOUTS)} or a mesh such as data=2,fsdp=2,tensor=2 "
                        "(-1 takes the remaining devices; default data=-1)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    p.add_argument("--batch", type=int, default=batch, help=f"global batch size in rows (default {batch})")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set num_layers=6 (repeatable)")
    p.add_argument("--log-every", type=int, default=log_every, help=f"steps between metrics (default {log_every})")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default 0: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"steps between checkpoints (default {checkpoint_every})")
    p.add_argument("--coordinator-address", help="host:port of process 0, for multi-process runs off TPU")
    p.add_argument("--num-processes", type=int, help="number of processes (with --coordinator-address)")
    p.add_argument("--process-id", type=int, help="this process's index (with --coordinator-address)")
    return p


def start(args: argparse.Namespace) -> Mesh:
    """Join the other processes (automatic on TPU VMs) and build the mesh of --mesh."""
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    return sharding.mesh_for(args.mesh)


def loop_config(args: argparse.Namespace) -> LoopConfig:
    """The loop settings given on the command line."""
    return LoopConfig(steps=args.steps, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every)


def local_rows(args: argparse.Namespace, mesh: Mesh) -> int:
    """This process's share of the global batch, which must split over the processes and
    over the mesh's batch axes (data x fsdp)."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % batch_shards or args.batch % jax.process_count():
        raise ValueError(
            f"--batch {args.batch} must be a multiple of data x fsdp = {batch_shards} and of the "
            f"{jax.process_count()} processes"
        )
    return args.batch // jax.process_count()
