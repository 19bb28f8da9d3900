"""Benchmarks of a sharded train step: the collectives and memory XLA compiled it to, its compile
and step time, throughput and MFU, and a roofline prediction of the step time on a named chip.

Collectives are read from the compiled HLO text (`compiled.as_text()`), which is the per-device
program: bytes are each device's result buffers, and an op in a while loop's body (the scanned
layers) counts once per iteration where XLA knows the trip count or the loop's condition is `i < N`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import sharding
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.train.metrics import device_peak_flops, gpt_flops_per_token, vit_flops_per_image
from zoo.train.steps import adamw, classification_loss, next_token_loss, train_state, train_step_fn

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}

# `%name = SHAPE opcode(`, SHAPE an array shape or a (nested) tuple of them.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?P<kind>body|calls|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(?P<n>\d+)"')
_CONDITION = re.compile(r"\bcondition=%?(?P<name>[\w.\-]+)")
_SCALAR_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((?P<n>\d+)\)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array ("f32[8,128]{1,0}") or the sum over a tuple's arrays."""
    return sum(DTYPE_BYTES.get(m["dtype"], 0) * math.prod(int(d) for d in m["dims"].split(",") if d)
               for m in _ARRAY.finditer(shape))


def _collective(op: str) -> str | None:
    """The collective an opcode performs, counting an async pair at its `-done` (None: not one)."""
    if op.endswith("-start"):
        return None
    base = op.removesuffix("-done")
    return base if base in COLLECTIVES else None


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """Each computation's instruction lines, and the entry computation's name (lines outside any
    computation, as in a bare snippet, belong to the computation named "")."""
    bodies: dict[str, list[str]] = defaultdict(list)
    current, entry = "", None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not _INSTRUCTION.match(line):
            current = header["name"]
            entry = current if header["entry"] else entry
        elif line.strip() == "}":
            current = ""
        else:
            bodies[current].append(line)
    return bodies, entry


def _loop_bound(condition: list[str]) -> int | None:
    """N of a loop condition `i < N` on one scalar constant (None: not of that form)."""
    constants = [int(m["n"]) for line in condition if (m := _SCALAR_CONSTANT.search(line))]
    less_than = any("compare(" in line and "direction=LT" in line for line in condition)
    return constants[0] if len(constants) == 1 and less_than else None


def _trip_count(line: str, bodies: dict[str, list[str]]) -> int:
    """Iterations of the while loop on `line`: XLA's known_trip_count, else the bound of its
    condition `i < N` (TPU-compiled scans carry no known_trip_count), else 1."""
    trip = _TRIP_COUNT.search(line)
    if trip:
        return int(trip["n"])
    condition = _CONDITION.search(line)
    return (condition and _loop_bound(bodies.get(condition["name"], []))) or 1


def _multipliers(bodies: dict[str, list[str]], entry: str | None) -> Callable[[str], int]:
    """How many times each computation runs per call of the program: a while body its known trip
    count times per run of its caller; computations nothing calls run once."""
    callers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in bodies.items():
        for line in lines:
            trip = _trip_count(line, bodies)
            for callee in _CALLEE.finditer(line):
                callers[callee["name"]].append((name, trip if callee["kind"] == "body" else 1))
            for branches in _BRANCHES.finditer(line):
                for callee in branches["names"].split(","):
                    callers[callee.strip().lstrip("%")].append((name, 1))

    @functools.cache
    def times(name: str) -> int:
        if name == entry or not callers[name]:
            return 1
        return sum(times(caller) * n for caller, n in callers[name])

    return times


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of every collective in compiled HLO text, for each kind in
    COLLECTIVES: ops executed per run of the program and the bytes of their results."""
    bodies, entry = _computations(hlo_text)
    times = _multipliers(bodies, entry)
    found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for name, lines in bodies.items():
        for line in lines:
            instruction = _INSTRUCTION.match(line)
            kind = instruction and _collective(instruction["op"])
            if kind:
                found[kind]["count"] += times(name)
                found[kind]["bytes"] += times(name) * shape_bytes(instruction["shape"])
    return found


def memory(compiled: jax.stages.Compiled) -> dict[str, int | None]:
    """Per-device bytes from XLA's memory analysis: arguments, outputs, aliased, temps, generated
    code (all None where the backend gives no analysis)."""
    analysis = compiled.memory_analysis()
    return {f"{kind}_bytes": None if analysis is None else getattr(analysis, f"{kind}_size_in_bytes", None)
            for kind in ("argument", "output", "alias", "temp", "generated_code")}


def cost(compiled: jax.stages.Compiled) -> dict[str, float | None]:
    """Per-device FLOPs and bytes accessed from XLA's cost analysis (None where it gives none)."""
    analysis = compiled.cost_analysis() or {}
    return {"flops": analysis.get("flops"), "bytes_accessed": analysis.get("bytes accessed")}


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model with its loss, the shapes of one global batch, and what a row is worth."""

    model: nn.Module
    loss_fn: Callable
    example_input: Any
    batch: Any  # a tree of jax.ShapeDtypeStruct
    flops_per_row: float
    items_per_row: int
    item_name: str


def workload(cfg: GPTConfig | ViTConfig, batch: int) -> Workload:
    """The training workload of a GPT (rows of context_length + 1 tokens) or a ViT (labelled images)."""
    if isinstance(cfg, GPTConfig):
        return Workload(GPT(cfg), next_token_loss, jnp.zeros((1, cfg.context_length), jnp.int32),
                        jax.ShapeDtypeStruct((batch, cfg.context_length + 1), jnp.int32),
                        gpt_flops_per_token(cfg) * cfg.context_length, cfg.context_length, "tokens")
    image = (*cfg.image_size, cfg.num_channels)
    return Workload(ViT(cfg), classification_loss, jnp.zeros((1, *image), jnp.float32),
                    {"image": jax.ShapeDtypeStruct((batch, *image), jnp.float32),
                     "label": jax.ShapeDtypeStruct((batch,), jnp.int32)},
                    vit_flops_per_image(cfg), 1, "images")


def default_optimizer() -> optax.GradientTransformation:
    """GPT-3's AdamW (the optimizer state the experiments carry)."""
    return adamw(3e-4, total_steps=1000, warmup_steps=10)


def state_shardings(work: Workload, optimizer: optax.GradientTransformation, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract train state {params, opt_state, step, rng} with shardings, the shardings)."""
    boxed = jax.eval_shape(lambda key: work.model.init(key, work.example_input)["params"], jax.random.key(0))
    param_shardings = sharding.logical_shardings(boxed, mesh)
    params = nn.unbox(boxed)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {"params": param_shardings,
                 "opt_state": sharding.optimizer_shardings(optimizer, params, param_shardings, mesh),
                 "step": replicated, "rng": replicated}
    abstract = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
                "step": jax.ShapeDtypeStruct((), jnp.int32),
                "rng": jax.eval_shape(jax.random.key_data, jax.random.key(0))}
    with_shardings = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                  abstract, shardings)
    return with_shardings, shardings


@dataclasses.dataclass
class CompiledStep:
    """A train step compiled for one layout, with what it takes to run it."""

    compiled: jax.stages.Compiled
    compile_s: float
    mesh: Mesh
    work: Workload
    optimizer: optax.GradientTransformation
    shardings: Any
    batch_sharding: NamedSharding


def compile_train_step(cfg: GPTConfig | ViTConfig, layout: str, batch: int,
                       optimizer: optax.GradientTransformation | None = None,
                       devices: Sequence[Any] | None = None) -> CompiledStep:
    """Lower and compile one train step of `cfg` on the mesh of `layout` (a LAYOUTS name or a spec)
    over `devices` (default: all; abstract TPU chips compile ahead of time) from abstract inputs
    only: nothing is allocated."""
    mesh = sharding.mesh_for(layout, devices)
    work = workload(cfg, batch)
    optimizer = optimizer or default_optimizer()
    abstract, shardings = state_shardings(work, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding),
                                  work.batch)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(train_step_fn(work.model, optimizer, work.loss_fn), in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    start = time.perf_counter()
    with sharding.sharding_context(mesh):
        compiled = step.lower(abstract, abstract_batch).compile()
    return CompiledStep(compiled, time.perf_counter() - start, mesh, work, optimizer, shardings, batch_sharding)


def _initial_state(step: CompiledStep, seed: int) -> dict:
    """A fresh train state built directly in the step's shardings."""

    def init(key: jax.Array) -> dict:
        return train_state(nn.unbox(step.work.model.init(key, step.work.example_input)["params"]), step.optimizer, key)

    with sharding.sharding_context(step.mesh):
        return jax.jit(init, out_shardings=step.shardings)(jax.random.key(seed))


def _random_batch(step: CompiledStep, seed: int) -> Any:
    """A global batch of the workload's shapes (token ids below the vocabulary, labels below the
    classes, normal images), placed in the batch sharding."""
    rng = np.random.default_rng(seed)
    cfg = step.work.model.cfg

    def fill(spec: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(spec.dtype, jnp.integer):
            high = cfg.vocab_size if isinstance(cfg, GPTConfig) else cfg.num_classes
            values = rng.integers(0, high, spec.shape, dtype=np.int32)
        else:
            values = rng.standard_normal(spec.shape, dtype=np.float32)
        return jax.device_put(values, step.batch_sharding)

    return jax.tree.map(fill, step.work.batch)


def time_step(step: CompiledStep, repeats: int, seed: int = 0) -> float:
    """Median seconds of `repeats` steps after one warm-up step, on real (random) inputs."""
    state, batch = _initial_state(step, seed), _random_batch(step, seed)
    state, metrics = step.compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step.compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_layout(cfg: GPTConfig | ViTConfig, layout: str, batch: int, repeats: int = 3) -> dict[str, Any]:
    """Compile and time a train step of `cfg` under `layout`: compile and step seconds, items/s,
    MFU, per-device memory and collectives. Real inputs are allocated: small configs only on CPU."""
    step = compile_train_step(cfg, layout, batch)
    step_s = time_step(step, repeats)
    rows_per_s = batch / step_s
    peak, _ = device_peak_flops()
    return {
        "layout": layout,
        "mesh": dict(step.mesh.shape),
        "compile_s": step.compile_s,
        "step_s": step_s,
        f"{step.work.item_name}_per_s": rows_per_s * step.work.items_per_row,
        "mfu": rows_per_s * step.work.flops_per_row / (step.mesh.size * peak),
        "model_flops_per_device": batch * step.work.flops_per_row / step.mesh.size,
        "cost": cost(step.compiled),
        "memory": memory(step.compiled),
        "collectives": collectives(step.compiled.as_text()),
    }


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: dense bf16 FLOP/s, HBM bytes and bytes/s, interconnect bytes/s."""

    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: float


GiB, GB = 2**30, 1e9
# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e;
# v4's ICI figure is from the v5p page's comparison table; Gbps / 8 = GB/s), NVIDIA's H100 and
# H200 data sheets (SXM: dense bf16 without sparsity; NVLink 900 GB/s per GPU).
CHIPS = {
    "tpu-v4": Chip(275e12, 32 * GiB, 1200 * GB, 2400 / 8 * GB),
    "tpu-v5e": Chip(197e12, 16 * GiB, 819 * GB, 1600 / 8 * GB),
    "tpu-v5p": Chip(459e12, 95 * GiB, 2765 * GB, 4800 / 8 * GB),
    "tpu-v6e": Chip(918e12, 32 * GiB, 1640 * GB, 3584 / 8 * GB),
    "h100": Chip(989e12, 80 * GB, 3350 * GB, 900 * GB),
    "h200": Chip(989e12, 141 * GB, 4800 * GB, 900 * GB),
}


def roofline(flops: float, hbm_bytes: float, collective_bytes: float, chip: Chip | str) -> float:
    """Predicted step seconds on one chip, from its share of the FLOPs, HBM traffic and collective
    traffic: the slowest of compute, memory and interconnect, as if they overlapped perfectly."""
    chip = CHIPS[chip] if isinstance(chip, str) else chip
    return max(flops / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth, collective_bytes / chip.ici_bandwidth)


def predicted_mfu(flops: float, hbm_bytes: float, collective_bytes: float, chip: Chip | str) -> float:
    """The MFU the roofline allows: compute time at peak over the predicted step time."""
    chip = CHIPS[chip] if isinstance(chip, str) else chip
    return flops / chip.peak_flops / roofline(flops, hbm_bytes, collective_bytes, chip)


def predict(row: dict[str, Any], chip: Chip | str) -> dict[str, float | None]:
    """Roofline step seconds and MFU on `chip` of a `measure_layout` or `aot_layout` row: its model FLOPs per device,
    the compiled program's bytes accessed standing in for HBM traffic, and its collective bytes."""
    hbm_bytes = row["cost"]["bytes_accessed"]
    if hbm_bytes is None:
        return {"step_s": None, "mfu": None}
    flops, collective_bytes = row["model_flops_per_device"], sum(c["bytes"] for c in row["collectives"].values())
    return {"step_s": roofline(flops, hbm_bytes, collective_bytes, chip),
            "mfu": predicted_mfu(flops, hbm_bytes, collective_bytes, chip)}


def topology_chip(topology: str) -> str:
    """The CHIPS name of a TPU topology such as "v5p:8x8x8" ("tpu-v5p")."""
    chip = "tpu-" + topology.partition(":")[0].lower()
    if chip not in CHIPS:
        raise ValueError(f"topology {topology!r}: no figures for {chip!r}; known chips are {list(CHIPS)}")
    return chip


def topology_devices(topology: str) -> list[Any]:
    """The abstract chips of a TPU topology such as "v5e:2x2" (needs libtpu, not a TPU)."""
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology, "tpu").devices)


def peak_memory(mem: dict[str, int | None]) -> int | None:
    """Per-device bytes a step holds at its peak: arguments, temps, generated code and the outputs
    that do not reuse donated arguments' buffers (None without a memory analysis)."""
    if mem["argument_bytes"] is None or mem["output_bytes"] is None or mem["temp_bytes"] is None:
        return None
    return (mem["argument_bytes"] + mem["temp_bytes"] + mem["output_bytes"] - (mem["alias_bytes"] or 0)
            + (mem["generated_code_bytes"] or 0))


def aot_layout(cfg: GPTConfig | ViTConfig, layout: str, batch: int, topology: str) -> dict[str, Any]:
    """Compile a train step of `cfg` under `layout` for the abstract chips of a TPU `topology`,
    running nothing: per-chip memory against the chip's HBM, cost, collectives and the roofline."""
    chip = topology_chip(topology)
    step = compile_train_step(cfg, layout, batch, devices=topology_devices(topology))
    mem = memory(step.compiled)
    peak = peak_memory(mem)
    row = {
        "layout": layout,
        "mesh": dict(step.mesh.shape),
        "topology": topology,
        "chip": chip,
        "compile_s": step.compile_s,
        "model_flops_per_device": batch * step.work.flops_per_row / step.mesh.size,
        "cost": cost(step.compiled),
        "memory": mem,
        "peak_bytes": peak,
        "hbm_bytes": CHIPS[chip].hbm_bytes,
        "fits": None if peak is None else peak <= CHIPS[chip].hbm_bytes,
        "collectives": collectives(step.compiled.as_text()),
    }
    row["predicted"] = predict(row, chip)
    return row
