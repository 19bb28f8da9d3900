"""zoo.bench: collectives read from HLO text (hand-written and compiled), memory, the roofline, and
experiments/bench_sharding.py run end to end on the 8 simulated devices. Machinery only, no timings."""

import dataclasses
import importlib.util
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from subprocess_env import experiment_module

from zoo import bench, configs, sharding
from zoo.alignment.reward import RewardModel
from zoo.models.gpt import GPT

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    *"--preset gpt2-small --set num_layers=1 --set d_model=32 --set num_heads=4".split(),
    *"--set d_ff=64 --set context_length=16 --set vocab_size=64".split(),
]

HLO = """\
HloModule snippet, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = bf16[4,256]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[16,256]{1,0} all-gather(%v), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = bf16[4,256]{1,0} reduce-scatter(%ag), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %t = (s32[], bf16[4,256]{1,0}) tuple(%i, %rs)
}

%cond (p: (s32[], bf16[4,256])) -> pred[] {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (a: f32[8,128], b: bf16[64]) -> f32[8,128] {
  %a = f32[8,128]{1,0} parameter(0)
  %b = bf16[64]{0} parameter(1)
  %ar = f32[8,128]{1,0} all-reduce(%a), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ars = f32[8,128]{1,0} all-reduce-start(%ar), channel_id=2, replica_groups={{0,1}}, to_apply=%add
  %ard = f32[8,128]{1,0} all-reduce-done(%ars)
  %pair = (f32[8,128]{1,0}, bf16[64]{0}) all-reduce(%ard, %b), channel_id=5, to_apply=%add
  %cps = (f32[8,128]{1,0}, f32[8,128]{1,0}, u32[], u32[]) collective-permute-start(%ard), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,128]{1,0} collective-permute-done(%cps)
  %a2a = s8[4,4]{1,0} all-to-all(%x), channel_id=6, dimensions={0}
  %w = (s32[], bf16[4,256]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[8,128]{1,0} add(%cpd, %ard)
}
"""  # noqa: E501 (HLO instructions are one line each)


def test_shape_bytes_of_arrays_tuples_and_dtypes():
    assert bench.shape_bytes("f32[8,128]{1,0}") == 4 * 8 * 128
    assert bench.shape_bytes("bf16[3,4]{1,0:T(8,128)(2,1)}") == 2 * 12
    assert bench.shape_bytes("(f32[2]{0}, bf16[3,4]{1,0}, pred[])") == 8 + 24 + 1
    assert bench.shape_bytes("((f32[2]), s8[5], /*index=2*/u32[])") == 8 + 5 + 4


def totals(found: dict) -> dict:
    """Each kind's count, bytes and link bytes (without the split by torus dimensions)."""
    return {
        kind: {key: value for key, value in counts.items() if key != "link_bytes_by_dims"}
        for kind, counts in found.items()
    }


def test_collectives_in_handwritten_hlo():
    found = totals(bench.collectives(HLO, num_devices=4))
    # Counted once per async pair, tuples summed; %pair names no groups, so it spans all 4 devices.
    assert found["all-reduce"] == {
        "count": 3,
        "bytes": 4096 + 4096 + (4096 + 128),
        "link_bytes": 4096 + 4096 + 2 * 3 / 4 * (4096 + 128),
    }
    assert found["collective-permute"] == {"count": 1, "bytes": 4096, "link_bytes": 4096}  # at -done
    assert found["all-to-all"] == {"count": 1, "bytes": 16, "link_bytes": 12}
    assert found["all-gather"] == {
        "count": 3,
        "bytes": 3 * 16 * 256 * 2,  # bf16, 3 loop iterations
        "link_bytes": 3 * 3 / 4 * 16 * 256 * 2,
    }
    assert found["reduce-scatter"] == {"count": 3, "bytes": 3 * 4 * 256 * 2, "link_bytes": 3 * 3 * 4 * 256 * 2}


def test_collectives_in_a_loop_bounded_by_its_condition():
    hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "").replace(
        "  ROOT %lt = pred[] constant(true)",
        "  %n = s32[]{:T(128)} constant(5)\n  %i = s32[] get-tuple-element(%p), index=0\n"
        "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
    )
    assert "known_trip_count" not in hlo
    assert bench.collectives(hlo)["all-gather"]["count"] == 5


def test_collectives_in_a_bare_snippet():
    snippet = "  %g = f32[4]{0} all-gather(%x), dimensions={0}\n  %n = f32[4]{0} negate(%g)\n"
    assert totals(bench.collectives(snippet, num_devices=2))["all-gather"] == {"count": 1, "bytes": 16, "link_bytes": 8}
    assert sum(c["count"] for c in bench.collectives(snippet).values()) == 1


def test_replica_groups_in_every_spelling():
    assert bench.group_size("all-gather(%x), replica_groups={{0,1,2},{3,4,5}}, dimensions={0}", 8) == 3
    assert bench.group_size("all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add", 8) == 4
    assert bench.group_size("all-reduce(%x), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add", 8) == 2
    mesh = "all-gather(%p), replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=8] {'axis_0','axis_2'}, dimensions={1}"
    assert bench.group_size(mesh, 64) == 32
    assert bench.group_size("all-reduce(%x), to_apply=%add", 8) == 8  # no groups: every device


def test_first_replica_group_in_every_spelling():
    def members(groups: str, devices: int = 8) -> list[int]:
        return bench.group_members(f"all-reduce(%x), replica_groups={groups}, to_apply=%add", devices).tolist()

    assert members("{{0,4},{1,5},{2,6},{3,7}}") == [0, 4]
    assert members("[2,4]<=[8]") == [0, 1, 2, 3]
    assert members("[4,2]<=[2,4]T(1,0)") == [0, 4]  # iota [2,4] transposed: columns are groups
    assert members("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}") == [0, 4]
    assert members("mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_1','axis_2'}") == [0, 1, 2, 3]
    assert bench.group_members("all-reduce(%x), to_apply=%add", 3).tolist() == [0, 1, 2]


def test_groups_span_the_torus_dimensions_their_members_differ_in():
    coords = np.array([[x, y, 0] for y in range(2) for x in range(4)])  # a 4x2 torus slice, device i at coords[i]
    assert bench.torus_dims(np.array([0, 1, 2, 3]), coords) == 1  # along x
    assert bench.torus_dims(np.array([0, 4]), coords) == 1  # along y
    assert bench.torus_dims(np.arange(8), coords) == 2
    assert bench.torus_dims(np.arange(8), None) is None
    hlo = (
        "  %g = f32[8]{0} all-gather(%x), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}\n"
        "  %r = f32[8]{0} all-reduce(%y), replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add\n"
        "  %a = f32[8]{0} all-reduce(%z), to_apply=%add\n"
    )
    found = bench.collectives(hlo, 8, coords)
    assert found["all-gather"]["link_bytes_by_dims"] == {1: 3 / 4 * 32}
    assert found["all-reduce"]["link_bytes_by_dims"] == {1: 2 * 1 / 2 * 32, 2: 2 * 7 / 8 * 32}
    assert bench.collectives(hlo, 8)["all-gather"]["link_bytes_by_dims"] == {None: 3 / 4 * 32}


def test_a_collective_gets_the_links_of_the_torus_dimensions_it_spans():
    v5p = bench.CHIPS["tpu-v5p"]  # 3-D torus: one dimension's links carry a third of the chip's total
    assert v5p.link_bandwidth(1) == pytest.approx(v5p.ici_bandwidth / 3)
    assert v5p.link_bandwidth(3) == v5p.link_bandwidth(None) == v5p.ici_bandwidth
    assert bench.CHIPS["h100"].link_bandwidth(1) == bench.CHIPS["h100"].ici_bandwidth  # NVSwitch: any peer
    chip = bench.Chip(peak_flops=100.0, hbm_bytes=1e9, hbm_bandwidth=10.0, ici_bandwidth=6.0, torus_dims=3)
    assert bench.roofline(0, 0, {1: 4.0, 3: 6.0}, chip)["interconnect_s"] == 4.0 / 2.0 + 6.0 / 6.0
    assert bench.roofline(0, 0, 6.0, chip)["interconnect_s"] == 1.0  # no split given: every link


def test_link_bytes_follow_ring_algorithms():
    mib = 2**20
    assert bench.link_bytes("all-reduce", 8 * mib, 8) == 2 * 7 * mib  # reduce-scatter + all-gather
    assert bench.link_bytes("all-gather", 8 * mib, 8) == 7 * mib  # the 7 shards it lacks
    assert bench.link_bytes("reduce-scatter", mib, 8) == 7 * mib  # 7 partial shards out
    assert bench.link_bytes("all-to-all", 8 * mib, 8) == 7 * mib
    assert bench.link_bytes("collective-permute", mib, 2) == mib
    assert bench.link_bytes("all-reduce", mib, 1) == 0  # a group of one moves nothing


def test_collectives_and_memory_of_a_compiled_sharded_function():
    mesh = jax.make_mesh((8,), ("x",))
    rows = NamedSharding(mesh, PartitionSpec("x"))
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(lambda a: a.sum(0), in_shardings=rows, out_shardings=replicated)
    compiled = fn.lower(jax.ShapeDtypeStruct((64, 32), jnp.float32)).compile()
    found = bench.collectives(compiled.as_text())
    gathered = found["all-reduce"]["count"] + found["all-gather"]["count"]
    assert gathered >= 1 and found["all-reduce"]["bytes"] + found["all-gather"]["bytes"] >= 32 * 4
    assert bench.memory(compiled)["argument_bytes"] == 64 * 32 * 4 // 8  # one device's rows


def test_memory_without_an_analysis():
    class NoAnalysis:
        def memory_analysis(self):
            return None

    assert set(bench.memory(NoAnalysis()).values()) == {None}


def test_roofline_takes_the_slowest_resource():
    chip = bench.Chip(peak_flops=100.0, hbm_bytes=1e9, hbm_bandwidth=10.0, ici_bandwidth=1.0)
    assert bench.roofline(1000, 50, 5, chip) == {
        "compute_s": 10.0,
        "memory_s": 5.0,
        "interconnect_s": 5.0,
        "step_s": 10.0,
    }
    assert bench.roofline(100, 300, 5, chip)["step_s"] == 30.0  # memory-bound
    assert bench.roofline(100, 50, 20, chip)["step_s"] == 20.0  # interconnect-bound
    v5e = bench.CHIPS["tpu-v5e"]
    assert bench.roofline(v5e.peak_flops, 0, 0, "tpu-v5e")["step_s"] == 1.0


def test_predict_from_a_measured_row():
    chip = bench.Chip(peak_flops=100.0, hbm_bytes=1e9, hbm_bandwidth=10.0, ici_bandwidth=1.0)
    found = {kind: {"count": 1, "bytes": 2, "link_bytes": 3.0} for kind in bench.COLLECTIVES}
    # XLA's FLOPs include recomputation (1333 for 1000 model FLOPs): the MFU bound is below 1.
    row = {"model_flops_per_device": 1000.0, "cost": {"flops": 1333.0, "bytes_accessed": 40.0}, "collectives": found}
    predicted = bench.predict(row, chip)
    assert predicted["bound"] == "interconnect" and predicted["step_s"] == 15.0  # 5 kinds x 3 bytes
    assert predicted["mfu"] == 1000.0 / 100.0 / 15.0
    row["cost"]["flops"] = 4000.0
    assert bench.predict(row, chip)["bound"] == "compute" and bench.predict(row, chip)["mfu"] == 0.25
    row["cost"]["bytes_accessed"] = None
    assert set(bench.predict(row, chip).values()) == {None}


def test_step_cost_counts_every_layer_that_the_layer_loop_hides():
    cfg = configs.gpt(
        "gpt3-small",
        num_layers=6,
        d_model=32,
        num_heads=4,
        d_ff=64,
        context_length=16,
        vocab_size=64,
        window=8,
        remat="full",
    )
    # XLA's cost analysis counts a loop's body once; the step's cost is that of the unrolled program
    unrolled = bench.cost(bench.compile_train_step(dataclasses.replace(cfg, scan_unroll=3), "fsdp", 8).compiled)
    whole = bench.step_cost(cfg, "fsdp", 8)
    assert whole["flops"] == pytest.approx(unrolled["flops"], rel=1e-3)
    assert whole["bytes_accessed"] == pytest.approx(unrolled["bytes_accessed"], rel=0.05)


def test_step_cost_counts_every_micro_batch_that_gradient_accumulation_hides():
    cfg = configs.gpt(
        "gpt3-small", num_layers=2, d_model=32, num_heads=4, d_ff=64, context_length=16, vocab_size=64, window=8
    )  # one (dense, banded) scan step: the micro-batches are the loop
    whole = bench.cost(
        bench.compile_train_step(
            dataclasses.replace(cfg, scan_unroll=1), "fsdp", 32, accumulation_steps=4, unroll_accumulation=True
        ).compiled
    )
    estimate = bench.step_cost(cfg, "fsdp", 32, accumulation_steps=4)
    # Within a few FLOPs per parameter and micro-batch: with one micro-batch XLA folds the gradient's
    # addition to the zero total away. Here that is 0.7% of a tiny step (128 tokens per micro-batch).
    assert estimate["flops"] == pytest.approx(whole["flops"], rel=1e-2)
    assert estimate["bytes_accessed"] == pytest.approx(whole["bytes_accessed"], rel=0.05)


def test_the_roofline_counts_the_attention_flops_xla_cannot_see_in_the_splash_kernel():
    cfg = configs.gpt("gpt3-small", num_layers=2, context_length=512, window=128)
    xla = {"flops": 1e12, "bytes_accessed": 5e9}
    # 12 · layers · d_model · keys per token, keys averaged over the (dense, banded) pair.
    attention = 2 * 512 * 12 * 2 * 768 * (512 + 128) / 2
    assert bench.with_kernel_flops(xla, cfg, 2, True) == {
        "flops": 1e12 + attention,
        "bytes_accessed": 5e9,
        "kernel_flops": attention,
    }
    assert bench.with_kernel_flops(xla, cfg, 2, False) == xla | {"kernel_flops": 0.0}


def test_every_chip_has_positive_figures():
    assert {"tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "h100", "h200"} <= set(bench.CHIPS)
    assert all(
        min(chip.peak_flops, chip.hbm_bytes, chip.hbm_bandwidth, chip.ici_bandwidth) > 0
        for chip in bench.CHIPS.values()
    )
    assert {name: chip.torus_dims for name, chip in bench.CHIPS.items() if name.startswith("tpu")} == {
        "tpu-v4": 3,
        "tpu-v5e": 2,
        "tpu-v5p": 3,
        "tpu-v6e": 2,
    }


def test_layouts_that_do_not_fit_are_explained():
    script = experiment_module("bench_sharding")
    cfg = configs.gpt("gpt2-small", num_heads=4, d_model=32, d_ff=64, vocab_size=64)
    assert script.misfit(cfg, "dp", 8) is None
    assert "num_heads=4 is not a multiple of tensor=8" in script.misfit(cfg, "tp", 8)
    assert "batch=6" in script.misfit(cfg, "fsdp", 6)
    assert "batch=16 does not split into 3 micro-batches" in script.misfit(cfg, "fsdp", 16, accumulation_steps=3)
    assert "micro-batch=4 is not a multiple of data x fsdp=8" in script.misfit(cfg, "fsdp", 16, accumulation_steps=4)
    assert "devices" in script.misfit(cfg, "data=3", 8)


def test_topology_chip_is_read_from_the_name():
    assert bench.topology_chip("v5p:8x8x8") == "tpu-v5p" and bench.topology_chip("v5e:2x2") == "tpu-v5e"
    with pytest.raises(ValueError, match="no figures"):
        bench.topology_chip("v9:2x2")


def test_peak_memory_counts_outputs_beyond_donated_buffers():
    mem = {"argument_bytes": 100, "output_bytes": 60, "alias_bytes": 50, "temp_bytes": 30, "generated_code_bytes": 5}
    assert bench.peak_memory(mem) == 100 + 30 + 10 + 5
    assert bench.peak_memory(dict(mem, temp_bytes=None)) is None


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="AOT compilation for TPU topologies needs libtpu: pip install 'zoo[tpu]'",
)


def run(capsys: pytest.CaptureFixture, *args: str) -> str:
    """What bench_sharding.py prints with `args`, run in this process (its 8 simulated devices)."""
    experiment_module("bench_sharding").main(list(args))
    return capsys.readouterr().out


def test_tiny_run_reports_every_layout(tmp_path, capsys):
    layouts = ("dp", "fsdp")
    files = ["--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]
    out = run(capsys, *TINY, *"--batch 8 --repeats 1 --layouts".split(), *layouts, *files, "--chip", "tpu-v5e")
    rows = {row["layout"]: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert set(rows) == set(layouts) and all(name in out for name in layouts) and "tpu-v5e roofline" in out
    assert rows["dp"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert rows["fsdp"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for row in rows.values():
        assert row["step_s"] > 0 and row["compile_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0
        assert set(row["collectives"]) == set(bench.COLLECTIVES)
        assert row["predicted"]["step_s"] > 0 and 0 < row["predicted"]["mfu"] <= 1
        assert row["cost"]["flops"] > row["model_flops_per_device"]  # the whole step, optimizer included
    assert rows["dp"]["collectives"]["all-reduce"]["count"] >= 1  # gradients summed over replicas
    assert rows["dp"]["collectives"]["all-reduce"]["link_bytes"] > 0
    assert rows["fsdp"]["collectives"]["all-gather"]["count"] >= 1  # params gathered from their shards
    assert rows["dp"]["memory"]["argument_bytes"] > rows["fsdp"]["memory"]["argument_bytes"]  # state sharded
    assert (tmp_path / "b.png").stat().st_size > 0


@needs_libtpu
def test_aot_run_on_a_v5e_topology(tmp_path, capsys):
    out = run(
        capsys, *TINY, *"--batch 8 --layouts dp fsdp --topology v5e:2x2".split(), "--json", str(tmp_path / "a.json")
    )
    rows = {row["layout"]: row for row in json.loads((tmp_path / "a.json").read_text())["rows"]}
    assert set(rows) == {"dp", "fsdp"} and "tpu-v5e MFU" in out and "fits 16 GiB" in out
    assert rows["dp"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert rows["fsdp"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    for row in rows.values():
        assert row["chip"] == "tpu-v5e" and row["fits"] is True and 0 < row["peak_bytes"] <= row["hbm_bytes"]
        assert row["memory"]["argument_bytes"] > 0 and row["cost"]["flops"] > 0
        assert 0 < row["predicted"]["mfu"] <= 1 and row["predicted"]["step_s"] > 0
        assert row["predicted"]["bound"] in ("compute", "memory", "interconnect")
    assert rows["dp"]["collectives"]["all-reduce"]["count"] >= 1
    assert rows["fsdp"]["collectives"]["all-gather"]["link_bytes"] > 0
    assert rows["dp"]["memory"]["argument_bytes"] > rows["fsdp"]["memory"]["argument_bytes"]


@needs_libtpu
def test_a_layout_too_big_for_the_chips_memory_is_explained(capsys):
    # 1.07G parameters with AdamW: 17 GB replicated (dp) overflow a v5e's 16 GiB; 4.3 GB in fsdp's shards do not.
    big = "--set vocab_size=262144 --set d_model=4096 --set num_heads=32 --set d_ff=64".split()
    out = run(capsys, *TINY, *big, *"--batch 4 --layouts dp fsdp --topology v5e:2x2".split())
    assert "skipped dp: does not fit: RESOURCE_EXHAUSTED" in out and re.search(r"fsdp \|\s+1, 4, 1 \|", out)


@needs_libtpu
def test_a_mesh_axis_that_splits_a_torus_axis(monkeypatch):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # load libtpu beside another user
    cfg = configs.gpt("gpt2-small", num_heads=4, d_model=32, d_ff=64, vocab_size=64)
    devices = bench.topology_devices("v5p:8x8x8")
    script = experiment_module("bench_sharding")
    assert script.misfit(cfg, "fsdp", 512, devices) is None
    assert script.misfit(cfg, "fsdp_tp", 512, devices) is None  # tensor=2 splits one 8-chip axis
    assert dict(sharding.mesh_for("fsdp_tp", devices).shape) == {"data": 1, "fsdp": 256, "tensor": 2}


@needs_libtpu
def test_a_ppo_step_compiled_for_a_v5e_topology_holds_each_chips_shards_of_the_four_models(tmp_path, capsys):
    script = experiment_module("bench_sharding")
    with pytest.raises(SystemExit):
        script.parse_args(["--method", "ppo", "--preset", "vit-ti/16"])
    assert "'vit-ti/16' is not a GPT preset" in capsys.readouterr().err
    ppo = "--method ppo --prompt-tokens 4 --response-tokens 4 --batch 8 --layouts fsdp data=3 --topology v5e:2x2"
    script.main([*TINY, *ppo.split(), "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert "trained: policy + value + AdamW" in out and "fits tpu-v5e 16 GiB" in out and "skipped data=3" in out
    (row,) = [row for row in json.loads((tmp_path / "p.json").read_text())["rows"] if "skipped" not in row]
    assert row["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and row["chip"] == "tpu-v5e" and row["fits"] is True
    # By hand: the frozen SFT reference (a GPT) and reward model, each param's embed dimension split 4 ways by fsdp.
    cfg = script.model_config("gpt2-small", TINY[3::2])  # the --set values
    example = jnp.zeros((1, 4), jnp.int32)
    frozen = [jax.eval_shape(model.init, jax.random.key(0), example) for model in (GPT(cfg), RewardModel(cfg))]
    boxes = jax.tree.leaves(frozen, is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))
    whole = sum(box.value.size * box.value.dtype.itemsize for box in boxes)
    by_hand = sum(box.value.size * box.value.dtype.itemsize // (4 if "embed" in box.names else 1) for box in boxes)
    assert row["constants_bytes"] == by_hand < whole / 2
    # The trained policy and value model have the frozen ones' shapes, and AdamW's two moments beside them;
    # XLA's arguments hold them all (and the batch; TPU tiles pad small shards).
    assert row["state_bytes"] == pytest.approx(3 * row["constants_bytes"], rel=0.01)
    assert row["state_bytes"] + row["constants_bytes"] <= row["memory"]["argument_bytes"] < row["peak_bytes"]
