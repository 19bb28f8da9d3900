"""Benchmarks of a sharded train step: the collectives and memory XLA compiled it to, its compile
and step time, throughput and MFU, and a roofline prediction of the step time on a named chip.

Collectives are read from the compiled HLO text (`compiled.as_text()`), which is the per-device
program: bytes are each device's result buffers, and an op in a while loop's body (the scanned
layers) counts once per iteration where XLA knows the trip count or the loop's condition is `i < N`.
XLA's cost analysis, by contrast, counts a loop body once: `step_cost` works around that.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import sharding, tasks
from zoo.alignment import ppo
from zoo.models.gpt import GPT, GPTConfig
from zoo.models.image_to_text import ImageToText, ImageToTextConfig
from zoo.models.two_tower import TwoTower, TwoTowerConfig
from zoo.models.vit import ViT, ViTConfig
from zoo.train.loop import Task, initial_state, skipping_non_finite, state_shardings
from zoo.train.metrics import device_peak_flops, gpt_attention_flops_per_token, gpt_flops_per_token, vit_flops_per_image
from zoo.train.steps import adamw, classification_loss, next_token_loss, train_step_fn

MOSAIC_KERNEL = 'custom_call_target="tpu_custom_call"'  # a Pallas kernel (splash attention) in TPU HLO
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# The models a train step is benchmarked for: a GPT, a ViT, or an image + text model of one of each.
ModelConfig = GPTConfig | ViTConfig | ImageToTextConfig | TwoTowerConfig
# An image + text config's model and training task.
IMAGE_TEXT = {ImageToTextConfig: (ImageToText, tasks.image_captioning), TwoTowerConfig: (TwoTower, tasks.contrastive)}

DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}

# `%name = SHAPE opcode(`, SHAPE an array shape or a (nested) tuple of them.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?P<kind>body|calls|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(?P<n>\d+)"')
_CONDITION = re.compile(r"\bcondition=%?(?P<name>[\w.\-]+)")
_SCALAR_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((?P<n>\d+)\)")
_OPERAND = re.compile(r"\(%?(?P<name>[\w.\-]+)")
# Replica groups, three spellings: {{0,1,2,3},{4,5,6,7}}; iota [groups,size]<=[devices]; mesh['a'=4,'b'=2] {'a'}.
_GROUPS_LIST = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<dims>[\d,]+)\]<=\[(?P<reshape>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<over>[^}]*)\}")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array ("f32[8,128]{1,0}") or the sum over a tuple's arrays."""
    return sum(
        DTYPE_BYTES.get(m["dtype"], 0) * math.prod(int(d) for d in m["dims"].split(",") if d)
        for m in _ARRAY.finditer(shape)
    )


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


def group_members(line: str, num_devices: int) -> np.ndarray:
    """Device indices (into the program's device assignment) of the first replica group of the
    collective on `line`; every device when it names none."""
    if listed := _GROUPS_LIST.search(line):
        return np.array([int(i) for i in listed["first"].split(",") if i])
    if iota := _GROUPS_IOTA.search(line):
        groups = [int(d) for d in iota["dims"].split(",")]
        ids = np.arange(math.prod(groups)).reshape([int(d) for d in iota["reshape"].split(",")])
        if iota["perm"]:
            ids = ids.transpose([int(d) for d in iota["perm"].split(",")])
        return ids.reshape(groups[0], -1)[0]
    if mesh := _GROUPS_MESH.search(line):
        sizes = {name.strip(" '"): int(size) for name, size in (axis.split("=") for axis in mesh["axes"].split(","))}
        over = {name.strip(" '") for name in mesh["over"].split(",")}
        ids = np.arange(math.prod(sizes.values())).reshape(list(sizes.values()))
        return ids[tuple(slice(None) if name in over else 0 for name in sizes)].ravel()
    return np.arange(num_devices)


def group_size(line: str, num_devices: int) -> int:
    """Devices in each replica group of the collective on `line` (all `num_devices` when it names none)."""
    return len(group_members(line, num_devices))


def torus_dims(members: np.ndarray, coords: np.ndarray | None) -> int | None:
    """How many torus dimensions a group of devices spans (its members' coordinates differ along
    them); None without coordinates (devices on a switch, or CPUs)."""
    if coords is None:
        return None
    return int(sum(len(set(column)) > 1 for column in coords[members].T))


def link_bytes(kind: str, result_bytes: int, group: int) -> float:
    """Bytes one device sends over its links for a collective of `kind` in a group of `group` devices,
    by bandwidth-optimal (ring) algorithms: a gather or all-to-all moves the (n-1)/n of the result it
    lacks, a reduce-scatter n-1 result-sized shards, an all-reduce both (2(n-1)/n), a permute it all."""
    if kind == "collective-permute":
        return result_bytes
    share = (group - 1) / group
    return (
        result_bytes
        * {"all-gather": share, "all-to-all": share, "all-reduce": 2 * share, "reduce-scatter": group - 1}[kind]
    )


def collectives(hlo_text: str, num_devices: int = 1, coords: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """{kind: {"count", "bytes", "link_bytes", "link_bytes_by_dims"}} of every collective in compiled HLO
    text, for each kind in COLLECTIVES: ops executed per run of the program, the bytes of their results,
    and the bytes each device sends for them (`link_bytes`; a collective naming no replica groups spans
    `num_devices`), also split by how many torus dimensions their groups span, given the devices'
    coordinates `coords` [devices, dims] in the program's device order (key None without them). An
    async pair counts once, with the groups its -start names."""
    bodies, entry = _computations(hlo_text)
    times = _multipliers(bodies, entry)
    by_name = {m["name"]: line for lines in bodies.values() for line in lines if (m := _INSTRUCTION.match(line))}
    found = {
        kind: {"count": 0, "bytes": 0, "link_bytes": 0.0, "link_bytes_by_dims": defaultdict(float)}
        for kind in COLLECTIVES
    }
    for name, lines in bodies.items():
        for line in lines:
            instruction = _INSTRUCTION.match(line)
            kind = instruction and _collective(instruction["op"])
            if not kind:
                continue
            start = _OPERAND.search(line, instruction.end() - 1) if instruction["op"].endswith("-done") else None
            members = group_members(by_name.get(start["name"], line) if start else line, num_devices)
            size = shape_bytes(instruction["shape"])
            sent = times(name) * link_bytes(kind, size, len(members))
            found[kind]["count"] += times(name)
            found[kind]["bytes"] += times(name) * size
            found[kind]["link_bytes"] += sent
            found[kind]["link_bytes_by_dims"][torus_dims(members, coords)] += sent
    for counts in found.values():
        counts["link_bytes_by_dims"] = dict(counts["link_bytes_by_dims"])
    return found


def memory(compiled: jax.stages.Compiled) -> dict[str, int | None]:
    """Per-device bytes from XLA's memory analysis: arguments, outputs, aliased, temps, generated
    code (all None where the backend gives no analysis)."""
    analysis = compiled.memory_analysis()
    return {
        f"{kind}_bytes": None if analysis is None else getattr(analysis, f"{kind}_size_in_bytes", None)
        for kind in ("argument", "output", "alias", "temp", "generated_code")
    }


def cost(compiled: jax.stages.Compiled) -> dict[str, float | None]:
    """Per-device FLOPs and bytes accessed from XLA's cost analysis (None where it gives none)."""
    analysis = compiled.cost_analysis() or {}
    return {"flops": analysis.get("flops"), "bytes_accessed": analysis.get("bytes accessed")}


def text_tokens(cfg: ImageToTextConfig | TwoTowerConfig) -> int:
    """Text tokens an image + text model reads per row: the decoder's context after the image tokens
    (image-to-text), or the text tower's whole context (two towers)."""
    if isinstance(cfg, ImageToTextConfig):
        return cfg.text.context_length - cfg.num_image_tokens
    return cfg.text.context_length


def batch_spec(cfg: ModelConfig, batch: int) -> Any:
    """The shapes of one global batch: rows of context_length + 1 tokens, labelled images, or images
    with texts (`text_tokens` of them, one more for image-to-text's next-token targets)."""
    if isinstance(cfg, GPTConfig):
        return jax.ShapeDtypeStruct((batch, cfg.context_length + 1), jnp.int32)
    vision = cfg if isinstance(cfg, ViTConfig) else cfg.vision
    image = jax.ShapeDtypeStruct((batch, *vision.image_size, vision.num_channels), jnp.float32)
    if isinstance(cfg, ViTConfig):
        return {"image": image, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    length = text_tokens(cfg)
    if isinstance(cfg, TwoTowerConfig):
        rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
        return {"image": image, "tokens": jax.ShapeDtypeStruct((batch, length), jnp.int32), "lengths": rows}
    return {
        "image": image,
        "tokens": jax.ShapeDtypeStruct((batch, length + 1), jnp.int32),
        "prompt_lengths": jax.ShapeDtypeStruct((batch,), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((batch, length), jnp.float32),
    }


def random_inputs(cfg: ModelConfig, spec: Any, rng: np.random.Generator) -> Any:
    """Random arrays of `batch_spec` shapes `spec`: token ids below the vocabulary, labels below the
    classes, normal images; an image-to-text row's prompt of 1 to L tokens, the loss mask on the rest;
    a two-tower text of 1 to T real tokens."""
    if isinstance(cfg, GPTConfig):
        return rng.integers(0, cfg.vocab_size, spec.shape, dtype=np.int32)
    arrays = {"image": rng.standard_normal(spec["image"].shape, dtype=np.float32)}
    if isinstance(cfg, ViTConfig):
        return arrays | {"label": rng.integers(0, cfg.num_classes, spec["label"].shape, dtype=np.int32)}
    rows, width = spec["tokens"].shape
    arrays["tokens"] = rng.integers(0, cfg.text.vocab_size, (rows, width), dtype=np.int32)
    if isinstance(cfg, TwoTowerConfig):
        return arrays | {"lengths": rng.integers(1, width + 1, rows, dtype=np.int32)}
    prompt_lengths = rng.integers(1, width, rows, dtype=np.int32)  # width = L + 1
    loss_mask = (np.arange(width - 1) >= prompt_lengths[:, None] - 1).astype(np.float32)
    return arrays | {"prompt_lengths": prompt_lengths, "loss_mask": loss_mask}


def workload(cfg: ModelConfig, batch: int) -> Task:
    """The loop's training task of a GPT, a ViT or an image + text model (`tasks.image_captioning`,
    `tasks.contrastive`) on `random_inputs` batches of `batch_spec`'s shapes, batch k seeded by k."""
    local = batch_spec(cfg, batch // jax.process_count())  # this process's rows

    def random_batch(step: int) -> Any:
        return random_inputs(cfg, local, np.random.default_rng(step))

    if isinstance(cfg, GPTConfig):
        return Task(
            GPT(cfg),
            next_token_loss,
            np.zeros((1, cfg.context_length), np.int32),
            random_batch,
            None,
            batch,
            gpt_flops_per_token(cfg) * cfg.context_length,
            cfg.context_length,
            "tokens",
        )
    if isinstance(cfg, ViTConfig):
        return Task(
            ViT(cfg),
            classification_loss,
            np.zeros((1, *cfg.image_size, cfg.num_channels), np.float32),
            random_batch,
            None,
            batch,
            vit_flops_per_image(cfg),
            1,
            "images",
        )
    model, task = IMAGE_TEXT[type(cfg)]
    example = random_inputs(cfg, batch_spec(cfg, 1), np.random.default_rng(0))  # one row: the params' shapes
    return dataclasses.replace(
        task(model(cfg), example, example, batch, seed=0, eval_batches=0), train_batch=random_batch
    )


def default_optimizer() -> optax.GradientTransformation:
    """GPT-3's AdamW, skipping non-finite steps as the training loop does (the state runs carry)."""
    return skipping_non_finite(adamw(3e-4, total_steps=1000, warmup_steps=10))


@dataclasses.dataclass
class CompiledStep:
    """A train step compiled for one layout, with what it takes to run it."""

    compiled: jax.stages.Compiled
    compile_s: float
    mesh: Mesh
    task: Task
    optimizer: optax.GradientTransformation
    shardings: Any
    init_params: Callable[[jax.Array], Any]
    inputs: tuple = ()  # the abstract arguments it was compiled for: state, batch (and constants)


def with_sharding(tree: Any, placement: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves, every one laid out by `placement` (a batch's rows)."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement), tree)


def _compile(step_fn: Callable, mesh: Mesh, shardings: Any, *inputs: Any) -> tuple[jax.stages.Compiled, float]:
    """`step_fn(state, batch, ...) -> (state, metrics)` compiled for abstract `inputs` in their shardings,
    the state donated and returned in `shardings`, the metrics replicated; and the seconds it took."""
    step = jax.jit(
        step_fn,
        in_shardings=jax.tree.map(lambda x: x.sharding, inputs),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    start = time.perf_counter()
    with sharding.sharding_context(mesh):
        compiled = step.lower(*inputs).compile()
    return compiled, time.perf_counter() - start


def compile_train_step(
    cfg: ModelConfig,
    layout: str,
    batch: int,
    optimizer: optax.GradientTransformation | None = None,
    devices: Sequence[Any] | None = None,
    accumulation_steps: int = 1,
    unroll_accumulation: bool = False,
) -> CompiledStep:
    """Lower and compile one train step of `cfg` on the mesh of `layout` (a LAYOUTS name or a spec)
    over `devices` (default: all; abstract TPU chips compile ahead of time) from abstract inputs
    only: nothing is allocated. The batch's gradient may accumulate over `accumulation_steps`
    micro-batches (the loop unrolled with `unroll_accumulation`)."""
    mesh = sharding.mesh_for(layout, devices)
    task = workload(cfg, batch)
    optimizer = optimizer or default_optimizer()
    abstract, shardings, init_params = state_shardings(task, optimizer, mesh, jax.random.key(0))
    abstract_batch = with_sharding(batch_spec(cfg, batch), sharding.batch_sharding(mesh))
    step_fn = train_step_fn(task.model, optimizer, task.loss_fn, accumulation_steps, unroll_accumulation)
    compiled, seconds = _compile(step_fn, mesh, shardings, abstract, abstract_batch)
    return CompiledStep(
        compiled, seconds, mesh, task, optimizer, shardings, init_params, inputs=(abstract, abstract_batch)
    )


def compile_ppo_step(
    cfg: GPTConfig,
    layout: str,
    batch: int,
    devices: Sequence[Any] | None = None,
    prompt_tokens: int = 32,
    response_tokens: int = 32,
) -> CompiledStep:
    """Lower and compile one InstructGPT PPO-ptx iteration (`ppo.train_step`: a rollout of
    `response_tokens`, scoring, two epochs of two minibatch updates) of a `batch` of prompts on the
    mesh of `layout`, from abstract inputs only, as `compile_train_step` does. The trained policy
    and value model are the state; the frozen SFT reference and reward model, laid out by the same
    rules as the trained models of their shapes, are the constants."""
    mesh = sharding.mesh_for(layout, devices)
    optimizer = default_optimizer()
    prompts = {  # placeholders: only their shapes and dtypes matter
        "prompt": np.zeros((batch, prompt_tokens), np.int32),
        "length": np.full(batch, prompt_tokens, np.int32),
        "instruction": np.zeros(batch, np.int32),
    }
    pretraining = np.zeros((batch, cfg.context_length + 1), np.int32)
    config = ppo.PPOConfig(response_tokens=response_tokens, reward="model", ptx_coef=1.0)
    task = tasks.proximal_policy(
        GPT(cfg),
        config,
        prompts,
        pretraining,
        held_out=pretraining,
        global_batch=batch,
        seed=0,
        constants=None,  # laid out below, from the state's shapes
        start_params=None,
        stop_token=cfg.vocab_size - 1,
        eval_batches=0,
    )
    abstract, shardings, init_params = state_shardings(task, optimizer, mesh, jax.random.key(0))
    constants = {"reference": abstract["params"]["policy"], "reward": abstract["params"]["value"]}
    task = dataclasses.replace(task, constants=constants)
    abstract_batch = with_sharding({**prompts, "ptx": pretraining}, sharding.batch_sharding(mesh))
    compiled, seconds = _compile(task.train_step(optimizer), mesh, shardings, abstract, abstract_batch, constants)
    return CompiledStep(
        compiled, seconds, mesh, task, optimizer, shardings, init_params, inputs=(abstract, abstract_batch, constants)
    )


def device_bytes(tree: Any) -> int:
    """Bytes of a tree of abstract arrays with shardings that one device holds: each leaf's shard."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def ppo_layout(
    cfg: GPTConfig,
    layout: str,
    batch: int,
    topology: str | None = None,
    prompt_tokens: int = 32,
    response_tokens: int = 32,
) -> dict[str, Any]:
    """Compile a PPO iteration of `cfg` under `layout` on the local devices or, given a `topology`,
    its abstract TPU chips, running nothing: XLA's per-device memory, and where it goes: the bytes
    each device holds of the trained state (policy and value model, their AdamW moments) and of the
    frozen models (reference and reward model); for a topology, whether the peak fits the chip's HBM."""
    devices = topology_devices(topology) if topology else None
    step = compile_ppo_step(cfg, layout, batch, devices, prompt_tokens, response_tokens)
    state, _, constants = step.inputs
    mem = memory(step.compiled)
    row = {
        "layout": layout,
        "mesh": dict(step.mesh.shape),
        "compile_s": step.compile_s,
        "memory": mem,
        "peak_bytes": peak_memory(mem),
        "state_bytes": device_bytes(state),
        "constants_bytes": device_bytes(constants),
    }
    if topology:
        chip = topology_chip(topology)
        hbm = CHIPS[chip].hbm_bytes
        row |= {
            "topology": topology,
            "chip": chip,
            "hbm_bytes": hbm,
            "fits": None if row["peak_bytes"] is None else row["peak_bytes"] <= hbm,
        }
    return row


def _towers(cfg: ModelConfig) -> dict[str, GPTConfig | ViTConfig]:
    """The layer stacks of a model by field name: a GPT or ViT is its own ("": cfg); an image + text
    model has its "vision" and "text" towers."""
    return {"": cfg} if isinstance(cfg, GPTConfig | ViTConfig) else {"vision": cfg.vision, "text": cfg.text}


def _scan_period(tower: GPTConfig | ViTConfig) -> int:
    """Layers per step of a tower's layer scan: a GPT's attention pattern, one ViT layer."""
    return len(tower.attention_pattern) if isinstance(tower, GPTConfig) else 1


def _shallow(cfg: ModelConfig, depths: dict[str, int]) -> ModelConfig:
    """`cfg` with each tower `depths[name]` scan steps deep and unrolled (no loop)."""
    shallow = {
        name: dataclasses.replace(tower, num_layers=depths[name] * _scan_period(tower), scan_unroll=depths[name])
        for name, tower in _towers(cfg).items()
    }
    return shallow[""] if "" in shallow else dataclasses.replace(cfg, **shallow)


def step_cost(
    cfg: ModelConfig,
    layout: str,
    batch: int,
    optimizer: optax.GradientTransformation | None = None,
    devices: Sequence[Any] | None = None,
    accumulation_steps: int = 1,
    compiled: jax.stages.Compiled | None = None,
) -> dict[str, float | None]:
    """XLA's per-device FLOPs and bytes accessed for a whole train step. XLA's cost analysis counts a
    loop's body once, which would hide all layers but one behind the layer scan (and all micro-batches
    but one behind gradient accumulation); so shallow models are compiled without loops and their
    cost extrapolated: one and two scan steps deep give a scan step's cost (every one costs the same;
    an image + text model's towers deepened one at a time), and, with k micro-batches, two unrolled
    micro-batches give one micro-batch's cost beside the optimizer update's. `compiled`: the step of
    these arguments, already compiled (`compile_train_step`); a step that hides no loop (one
    unrolled scan step per tower, one micro-batch) is its own shallow model, not compiled again."""
    towers = _towers(cfg)
    steps = {name: tower.num_layers // _scan_period(tower) for name, tower in towers.items()}
    ones = dict.fromkeys(towers, 1)
    micro = batch // accumulation_steps

    def cost_at(depths: dict[str, int], micro_batches: int) -> dict[str, float | None]:
        if compiled is not None and micro_batches == accumulation_steps == 1 and _shallow(cfg, depths) == cfg:
            return cost(compiled)
        return cost(
            compile_train_step(
                _shallow(cfg, depths),
                layout,
                micro * micro_batches,
                optimizer,
                devices,
                micro_batches,
                unroll_accumulation=True,
            ).compiled
        )

    one = cost_at(ones, 1)  # one scan step of each tower, one micro-batch, the update
    if None in one.values():
        return one
    scan_steps = {
        name: _difference(cost_at(ones | {name: 2}, 1), one) if steps[name] > 1 else dict.fromkeys(one, 0.0)
        for name in towers
    }
    deeper = {key: sum((steps[name] - 1) * scan_steps[name][key] for name in towers) for key in one}
    whole_batch = {key: one[key] + deeper[key] for key in one}
    if accumulation_steps == 1:
        return whole_batch
    micro_batch = _difference(cost_at(ones, 2), one)  # a micro-batch through one scan step of each tower
    return {key: whole_batch[key] + (accumulation_steps - 1) * (micro_batch[key] + deeper[key]) for key in one}


def _difference(more: dict[str, float], less: dict[str, float]) -> dict[str, float]:
    return {key: more[key] - less[key] for key in less}


def time_step(step: CompiledStep, repeats: int, seed: int = 0) -> float:
    """Median seconds of `repeats` steps after one warm-up step, on real (random) inputs."""
    with sharding.sharding_context(step.mesh):
        state = initial_state(step.init_params, step.optimizer, step.shardings, jax.random.key(seed))
    batch = sharding.shard_batch(step.task.train_batch(seed), step.mesh)
    state, metrics = step.compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step.compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_layout(
    cfg: ModelConfig,
    layout: str,
    batch: int,
    repeats: int = 3,
    with_cost: bool = False,
    accumulation_steps: int = 1,
) -> dict[str, Any]:
    """Compile and time a train step of `cfg` under `layout`: compile and step seconds, items/s,
    MFU, per-device memory, collectives and, `with_cost` (two more compiles, for `predict`), the
    whole step's cost. Real inputs are allocated: small configs only on CPU."""
    step = compile_train_step(cfg, layout, batch, accumulation_steps=accumulation_steps)
    step_s = time_step(step, repeats)
    rows_per_s = batch / step_s
    peak, _ = device_peak_flops()
    return {
        "layout": layout,
        "mesh": dict(step.mesh.shape),
        "compile_s": step.compile_s,
        "step_s": step_s,
        f"{step.task.item_name}_per_s": rows_per_s * step.task.items_per_row,
        "mfu": rows_per_s * step.task.flops_per_row / (step.mesh.size * peak),
        "model_flops_per_device": batch * step.task.flops_per_row / step.mesh.size,
        "cost": step_cost(cfg, layout, batch, accumulation_steps=accumulation_steps) if with_cost else None,
        "memory": memory(step.compiled),
        "collectives": collectives(step.compiled.as_text(), step.mesh.size),
    }


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: dense bf16 FLOP/s, HBM bytes and bytes/s, the bytes/s a chip can
    send over all its interconnect links at once (one way), and the dimensions of its torus (0: a
    switched network, where any group of devices gets all of it)."""

    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: float
    torus_dims: int = 0

    def link_bandwidth(self, dims: int | None) -> float:
        """Bytes/s a chip sends in a collective whose groups span `dims` torus dimensions: a ring along
        one dimension uses only that dimension's links (both ways), 1/torus_dims of the chip's total.
        Unknown spans (None) and switched networks get the total."""
        if dims is None or not self.torus_dims:
            return self.ici_bandwidth
        return self.ici_bandwidth * min(dims, self.torus_dims) / self.torus_dims


GiB, GB = 2**30, 1e9
# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
# "interchip interconnect BW" per chip (Gbps / 8 = GB/s one way; the v5p page's "bidirectional
# 1200 GBps" is the same figure counted both ways), 3-D tori for v4 and v5p (6 links a chip), 2-D for
# v5e and v6e (4 links); v4's figure is from the v5p page's comparison table. NVIDIA's H100 and H200
# data sheets (SXM: dense bf16 without sparsity; NVLink 900 GB/s per GPU counts both directions, so
# 450 GB/s one way, through NVSwitch to any peer).
CHIPS = {
    "tpu-v4": Chip(275e12, 32 * GiB, 1200 * GB, 2400 / 8 * GB, torus_dims=3),
    "tpu-v5e": Chip(197e12, 16 * GiB, 819 * GB, 1600 / 8 * GB, torus_dims=2),
    "tpu-v5p": Chip(459e12, 95 * GiB, 2765 * GB, 4800 / 8 * GB, torus_dims=3),
    "tpu-v6e": Chip(918e12, 32 * GiB, 1640 * GB, 3584 / 8 * GB, torus_dims=2),
    "h100": Chip(989e12, 80 * GB, 3350 * GB, 450 * GB),
    "h200": Chip(989e12, 141 * GB, 4800 * GB, 450 * GB),
}


def roofline(
    flops: float, hbm_bytes: float, link_bytes: float | dict[int | None, float], chip: Chip | str
) -> dict[str, float]:
    """Seconds one chip needs for its FLOPs at peak, its HBM traffic and its interconnect traffic
    (`link_bytes`, or {torus dimensions spanned: bytes} to charge each at its links' bandwidth), and
    the step time they allow if they overlap perfectly (the slowest of the three)."""
    chip = CHIPS[chip] if isinstance(chip, str) else chip
    by_dims = link_bytes if isinstance(link_bytes, dict) else {None: link_bytes}
    interconnect_s = sum(sent / chip.link_bandwidth(dims) for dims, sent in by_dims.items() if sent)
    times = {
        "compute_s": flops / chip.peak_flops,
        "memory_s": hbm_bytes / chip.hbm_bandwidth,
        "interconnect_s": float(interconnect_s),
    }
    return times | {"step_s": max(times.values())}


def predict(row: dict[str, Any], chip: Chip | str) -> dict[str, float | str | None]:
    """Roofline times on `chip` of a `measure_layout` or `aot_layout` row (the whole step's XLA FLOPs,
    rematerialisation included; its bytes accessed as HBM traffic; its collectives' link bytes, each
    at the bandwidth of the torus dimensions its groups span), the resource that bounds the step, and
    the MFU it allows: model FLOPs at peak over the step time."""
    chip = CHIPS[chip] if isinstance(chip, str) else chip
    flops, hbm_bytes = row["cost"]["flops"], row["cost"]["bytes_accessed"]
    if flops is None or hbm_bytes is None:
        return {"compute_s": None, "memory_s": None, "interconnect_s": None, "step_s": None, "bound": None, "mfu": None}
    by_dims: dict[int | None, float] = defaultdict(float)
    for found in row["collectives"].values():
        for dims, sent in found.get("link_bytes_by_dims", {None: found["link_bytes"]}).items():
            by_dims[dims] += sent
    times = roofline(flops, hbm_bytes, dict(by_dims), chip)
    bound = max(("compute", "memory", "interconnect"), key=lambda name: times[f"{name}_s"])
    return times | {"bound": bound, "mfu": row["model_flops_per_device"] / chip.peak_flops / times["step_s"]}


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
    return (
        mem["argument_bytes"]
        + mem["temp_bytes"]
        + mem["output_bytes"]
        - (mem["alias_bytes"] or 0)
        + (mem["generated_code_bytes"] or 0)
    )


def with_kernel_flops(
    xla_cost: dict[str, float | None], cfg: ModelConfig, rows_per_device: float, has_kernel: bool
) -> dict[str, float | None]:
    """XLA's cost with the attention FLOPs it cannot see added where the program calls the splash
    kernel (a custom call XLA counts as free): the model's count, every key of a dense layer, so an
    upper bound of the causal kernel's work, which skips the tiles above the diagonal. Only causal
    attention without masks calls it: a GPT's, or a two-tower model's text tower's (never a ViT's
    nor the image-to-text decoder's, which reads a prefix-LM mask)."""
    lm = cfg.text if isinstance(cfg, TwoTowerConfig) else cfg
    if not (has_kernel and isinstance(lm, GPTConfig)) or xla_cost["flops"] is None:
        return xla_cost | {"kernel_flops": 0.0}
    kernel = rows_per_device * lm.context_length * gpt_attention_flops_per_token(lm)
    return xla_cost | {"flops": xla_cost["flops"] + kernel, "kernel_flops": kernel}


def aot_layout(cfg: ModelConfig, layout: str, batch: int, topology: str, accumulation_steps: int = 1) -> dict[str, Any]:
    """Compile a train step of `cfg` under `layout` for the abstract chips of a TPU `topology`,
    running nothing: per-chip memory against the chip's HBM, cost, collectives and the roofline."""
    chip, devices = topology_chip(topology), topology_devices(topology)
    step = compile_train_step(cfg, layout, batch, devices=devices, accumulation_steps=accumulation_steps)
    hlo = step.compiled.as_text()
    mem = memory(step.compiled)
    peak = peak_memory(mem)
    xla_cost = step_cost(
        cfg, layout, batch, devices=devices, accumulation_steps=accumulation_steps, compiled=step.compiled
    )
    row = {
        "layout": layout,
        "mesh": dict(step.mesh.shape),
        "topology": topology,
        "chip": chip,
        "compile_s": step.compile_s,
        "model_flops_per_device": batch * step.task.flops_per_row / step.mesh.size,
        "accumulation_steps": accumulation_steps,
        "cost": with_kernel_flops(xla_cost, cfg, batch / step.mesh.size, MOSAIC_KERNEL in hlo),
        "memory": mem,
        "peak_bytes": peak,
        "hbm_bytes": CHIPS[chip].hbm_bytes,
        "fits": None if peak is None else peak <= CHIPS[chip].hbm_bytes,
        "collectives": collectives(hlo, step.mesh.size, np.array([device.coords for device in step.mesh.devices.flat])),
    }
    row["predicted"] = predict(row, chip)
    return row
