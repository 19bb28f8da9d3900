"""Sharding: a device mesh from a layout string, the one table of logical-axis rules, and
helpers that shard params, optimizer state and batches and compile a sharded train step.

Every layout uses the same rules; only the mesh shape differs. Mesh axes are always
("data", "fsdp", "tensor"), and an axis of size 1 shards nothing, so "data=8" is data
parallelism (params replicated), "fsdp=8" shards params along `embed` and the batch over
fsdp, "tensor=8" shards heads, mlp and vocab, and "fsdp=4,tensor=2" mixes the two.

Flax resolves a logical spec rule by rule, in the table's order, and skips a rule whose mesh
axes are already taken in the same spec. `batch` comes first, so an activation
("batch", "length", "embed") gets batch -> ("data", "fsdp") and its embed finds fsdp taken
and stays unsharded, while a param (no batch dim) gets embed -> fsdp: FSDP shards params
along embed but never activations, without a separate activation name in the model.
"""

from __future__ import annotations

import contextlib
import glob
import math
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]  # (logical name, mesh axes) pairs, as flax takes them

MESH_AXES = ("data", "fsdp", "tensor")

LAYOUTS = {
    "dp": "data=-1",
    "fsdp": "fsdp=-1",
    "tp": "tensor=-1",
    "fsdp_tp": "fsdp=-1,tensor=2",
    "dp_tp": "data=-1,tensor=2",
}

RULES = (
    ("batch", ("data", "fsdp")),  # first: an activation's embed then finds fsdp taken
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("classes", None),
)

_GOOGLE_PCI_VENDOR_ID = "0x1ae0"  # TPU chips on a TPU VM are PCI devices of this vendor


def mesh_from_string(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh from e.g. "data=2,fsdp=2,tensor=2"; missing axes
    are 1 and one axis may be -1 (the remaining devices).

    The axes are Auto, not Explicit: the model's logical constraints are hints for the
    partitioner to resolve, whereas Explicit axes would put shardings in every array's type
    and require them to be spelled out at every op. A mesh axis that is no product of a TPU
    slice's torus axes (tensor=2 on 8x8x8) splits a torus axis."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = _parse_mesh_spec(spec)
    shape = _resolve_sizes(spec, sizes, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # the torus cannot be cut along whole axes into this shape
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _parse_mesh_spec(spec: str) -> dict[str, int]:
    """Axis sizes named in a spec, checked item by item."""
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value.lstrip("-").isdigit():
            raise ValueError(f"mesh spec {spec!r}: malformed item {item!r}; expected axis=size, e.g. 'data=2,fsdp=-1'")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; valid axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if int(value) < 1 and int(value) != -1:
            raise ValueError(f"mesh spec {spec!r}: {name}={value}; sizes are positive or -1 (the remaining devices)")
        sizes[name] = int(value)
    return sizes


def _resolve_sizes(spec: str, sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """The mesh shape, with -1 filled in, whose product is the device count."""
    wildcards = [name for name, size in sizes.items() if size == -1]
    if len(wildcards) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {wildcards}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if wildcards:
        if num_devices % known:
            raise ValueError(
                f"mesh spec {spec!r}: the fixed axes (product {known}) do not divide the {num_devices} devices, "
                f"so {wildcards[0]}=-1 has no size"
            )
        sizes = {**sizes, wildcards[0]: num_devices // known}
    shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
    if math.prod(shape) != num_devices:
        product = " x ".join(f"{name}={size}" for name, size in zip(MESH_AXES, shape))
        raise ValueError(
            f"mesh spec {spec!r}: {product} = {math.prod(shape)} devices, but there are {num_devices} devices"
        )
    return shape


def mesh_for(layout_or_spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from a layout name in LAYOUTS ("fsdp") or a spec ("fsdp=4,tensor=2")."""
    if "=" in layout_or_spec:
        return mesh_from_string(layout_or_spec, devices)
    if layout_or_spec not in LAYOUTS:
        raise ValueError(
            f"unknown layout {layout_or_spec!r}; choose one of {LAYOUTS} or give a spec such as 'data=2,fsdp=-1'"
        )
    return mesh_from_string(LAYOUTS[layout_or_spec], devices)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = RULES) -> Iterator[None]:
    """Make `mesh` and `rules` current, so the model's logical constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _drop_trivial_axes(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """The spec without mesh axes of size 1, which shard nothing (dp params are all None)."""

    def keep(entry: Any) -> Any:
        axes = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(axis for axis in axes if axis is not None and mesh.shape[axis] > 1)
        return kept[0] if len(kept) == 1 else (kept or None)

    return PartitionSpec(*(keep(entry) for entry in spec))


def _mesh_sharding(logical_spec: PartitionSpec, mesh: Mesh, rules: Rules) -> NamedSharding:
    """The NamedSharding that `rules` give a logical spec on `mesh`."""
    return NamedSharding(mesh, _drop_trivial_axes(nn.logical_to_mesh_axes(logical_spec, rules), mesh))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """NamedShardings, shaped like the unboxed tree, for a tree of boxed (logically named) params;
    unboxed leaves are replicated."""
    return jax.tree.map(
        lambda spec: _mesh_sharding(spec, mesh, rules),
        nn.get_partition_spec(abstract_tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def init_sharded(init_fn: Callable, mesh: Mesh, *args: Any, rules: Rules = RULES) -> tuple[Any, Any]:
    """Run `init_fn(*args)` (returning boxed params) compiled with the rules' output shardings,
    so each device only ever builds its own shards. Returns (unboxed params, their shardings):
    bare arrays and a matching tree of NamedShardings, ready for jit's in/out_shardings."""
    with sharding_context(mesh, rules):
        shardings = logical_shardings(jax.eval_shape(init_fn, *args), mesh, rules)
        params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return params, shardings


def optimizer_shardings(optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for `optimizer.init(params)`: every copy of the params tree in the state
    (e.g. Adam's mu and nu) is sharded like the params, the rest (step counts) replicated. Where
    the optimizer is masked (frozen params: `optax.masked`, `optax.multi_transform`), its copies
    hold no array to shard."""
    state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)
    return optax.tree_map_params(
        optimizer,
        lambda leaf, sharding: leaf if masked(leaf) else sharding,
        state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )


def init_optimizer_sharded(
    optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh
) -> tuple[Any, Any]:
    """The optimizer state built directly in its shardings; returns (state, its shardings)."""
    shardings = optimizer_shardings(optimizer, params, param_shardings, mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(params), shardings


def batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    """Sharding of [batch, ...] arrays: rows split over data x fsdp, the rest replicated."""
    return _mesh_sharding(PartitionSpec("batch"), mesh, rules)


def shard_batch(local_batch: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """Global arrays from each process's own rows (a pytree of [local_batch, ...] arrays):
    the global batch is the processes' rows stacked in process order."""
    sharding = batch_sharding(mesh, rules)
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, np.asarray(rows)), local_batch)


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Start JAX's multi-process runtime, before any other JAX call: on a TPU VM from no
    arguments (JAX detects the hosts; harmless on one host), elsewhere from explicit ones;
    a no-op for a single process (no arguments off TPU, or num_processes=1)."""
    explicit = (coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized() or num_processes == 1:
        return
    if all(arg is None for arg in explicit):
        if _on_tpu_vm():
            jax.distributed.initialize()
        return
    if any(arg is None for arg in explicit):
        raise ValueError(
            f"give coordinator_address, num_processes and process_id together (or none on a TPU VM); got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, process_id={process_id}"
        )
    # CPU processes exchange collectives through gloo (the default has none across processes);
    # accelerator backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _on_tpu_vm() -> bool:
    """Whether TPU chips are attached, read from PCI without starting a JAX backend."""
    vendors = glob.glob("/sys/bus/pci/devices/*/vendor")
    return any(pathlib.Path(path).read_text().strip() == _GOOGLE_PCI_VENDOR_ID for path in vendors)


def jit_sharded(fn: Callable, mesh: Mesh, rules: Rules = RULES, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fn, **jit_kwargs)`, called (so traced) inside the mesh and rules context,
    so the logical constraints inside `fn` become sharding constraints."""
    compiled = jax.jit(fn, **jit_kwargs)

    def run(*args: Any) -> Any:
        with sharding_context(mesh, rules):
            return compiled(*args)

    return run
