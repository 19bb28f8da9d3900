"""zoo.bench: collectives read from HLO text (hand-written and compiled), memory, the roofline, and
experiments/bench_sharding.py run end to end on the 8 simulated devices. Machinery only, no timings."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from zoo import bench, configs

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--preset", "gpt2-small", "--set", "num_layers=1", "--set", "d_model=32", "--set", "num_heads=4",
        "--set", "d_ff=64", "--set", "context_length=16", "--set", "vocab_size=64"]

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
"""


def test_shape_bytes_of_arrays_tuples_and_dtypes():
    assert bench.shape_bytes("f32[8,128]{1,0}") == 4 * 8 * 128
    assert bench.shape_bytes("bf16[3,4]{1,0:T(8,128)(2,1)}") == 2 * 12
    assert bench.shape_bytes("(f32[2]{0}, bf16[3,4]{1,0}, pred[])") == 8 + 24 + 1
    assert bench.shape_bytes("((f32[2]), s8[5], /*index=2*/u32[])") == 8 + 5 + 4


def test_collectives_in_handwritten_hlo():
    found = bench.collectives(HLO)
    assert found["all-reduce"] == {"count": 3, "bytes": 4096 + 4096 + (4096 + 128)}  # async pair once, a tuple
    assert found["collective-permute"] == {"count": 1, "bytes": 4096}  # at -done, not the -start tuple
    assert found["all-to-all"] == {"count": 1, "bytes": 16}
    assert found["all-gather"] == {"count": 3, "bytes": 3 * 16 * 256 * 2}  # bf16, 3 loop iterations
    assert found["reduce-scatter"] == {"count": 3, "bytes": 3 * 4 * 256 * 2}


def test_collectives_in_a_loop_bounded_by_its_condition():
    hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "").replace(
        "  ROOT %lt = pred[] constant(true)",
        "  %n = s32[]{:T(128)} constant(5)\n  %i = s32[] get-tuple-element(%p), index=0\n"
        "  ROOT %lt = pred[] compare(%i, %n), direction=LT")
    assert "known_trip_count" not in hlo
    assert bench.collectives(hlo)["all-gather"] == {"count": 5, "bytes": 5 * 16 * 256 * 2}


def test_collectives_in_a_bare_snippet():
    snippet = "  %g = f32[4]{0} all-gather(%x), dimensions={0}\n  %n = f32[4]{0} negate(%g)\n"
    assert bench.collectives(snippet)["all-gather"] == {"count": 1, "bytes": 16}
    assert sum(c["count"] for c in bench.collectives(snippet).values()) == 1


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
    assert bench.roofline(1000, 50, 5, chip) == 10.0  # compute-bound
    assert bench.roofline(100, 300, 5, chip) == 30.0  # memory-bound
    assert bench.roofline(100, 50, 20, chip) == 20.0  # interconnect-bound
    assert bench.predicted_mfu(1000, 200, 5, chip) == 0.5
    assert bench.predicted_mfu(1000, 0, 0, chip) == 1.0
    v5e = bench.CHIPS["tpu-v5e"]
    assert bench.roofline(v5e.peak_flops, 0, 0, "tpu-v5e") == 1.0


def test_predict_from_a_measured_row():
    chip = bench.Chip(peak_flops=100.0, hbm_bytes=1e9, hbm_bandwidth=10.0, ici_bandwidth=1.0)
    found = {kind: {"count": 1, "bytes": 2} for kind in bench.COLLECTIVES}
    row = {"model_flops_per_device": 1000.0, "cost": {"flops": 0.0, "bytes_accessed": 400.0}, "collectives": found}
    assert bench.predict(row, chip) == {"step_s": 40.0, "mfu": 0.25}
    row["cost"]["bytes_accessed"] = None
    assert bench.predict(row, chip) == {"step_s": None, "mfu": None}


def test_every_chip_has_positive_figures():
    assert {"tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "h100", "h200"} <= set(bench.CHIPS)
    assert all(min(vars(chip).values()) > 0 for chip in bench.CHIPS.values())


def _script():
    spec = importlib.util.spec_from_file_location("bench_sharding", ROOT / "experiments" / "bench_sharding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layouts_that_do_not_fit_are_explained():
    script = _script()
    cfg = configs.gpt("gpt2-small", num_heads=4, d_model=32, d_ff=64, vocab_size=64)
    assert script.misfit(cfg, "dp", 8) is None
    assert "num_heads=4 is not a multiple of tensor=8" in script.misfit(cfg, "tp", 8)
    assert "batch=6" in script.misfit(cfg, "fsdp", 6)
    assert "devices" in script.misfit(cfg, "data=3", 8)


def test_topology_chip_is_read_from_the_name():
    assert bench.topology_chip("v5p:8x8x8") == "tpu-v5p" and bench.topology_chip("v5e:2x2") == "tpu-v5e"
    with pytest.raises(ValueError, match="no figures"):
        bench.topology_chip("v9:2x2")


def test_peak_memory_counts_outputs_beyond_donated_buffers():
    mem = {"argument_bytes": 100, "output_bytes": 60, "alias_bytes": 50, "temp_bytes": 30, "generated_code_bytes": 5}
    assert bench.peak_memory(mem) == 100 + 30 + 10 + 5
    assert bench.peak_memory(dict(mem, temp_bytes=None)) is None


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="AOT compilation for TPU topologies needs libtpu: pip install 'zoo[tpu]'")


def run(*args: str) -> str:
    env = {"JAX_PLATFORMS": "cpu", "PATH": "", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # AOT compiles touch no TPU: tolerate another libtpu user
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_sharding.py"), *args],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_lists_the_flags():
    out = run("--help")
    assert all(flag in out for flag in ("--preset", "--set", "--layouts", "--batch", "--repeats", "--json", "--plot",
                                       "--topology"))


def test_tiny_run_reports_every_layout(tmp_path):
    layouts = ("dp", "fsdp")
    out = run(*TINY, "--batch", "8", "--repeats", "1", "--layouts", *layouts, "--json", str(tmp_path / "b.json"),
              "--plot", str(tmp_path / "b.png"), "--chip", "tpu-v5e")
    rows = {row["layout"]: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert set(rows) == set(layouts) and all(name in out for name in layouts) and "tpu-v5e roofline" in out
    assert rows["dp"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert rows["fsdp"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for row in rows.values():
        assert row["step_s"] > 0 and row["compile_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0
        assert set(row["collectives"]) == set(bench.COLLECTIVES)
        assert row["predicted"]["step_s"] > 0 and 0 < row["predicted"]["mfu"] <= 1
    assert rows["dp"]["collectives"]["all-reduce"]["count"] >= 1  # gradients summed over replicas
    assert rows["fsdp"]["collectives"]["all-gather"]["count"] >= 1  # params gathered from their shards
    assert rows["dp"]["memory"]["argument_bytes"] > rows["fsdp"]["memory"]["argument_bytes"]  # state sharded
    assert (tmp_path / "b.png").stat().st_size > 0


@needs_libtpu
def test_aot_run_on_a_v5e_topology(tmp_path):
    out = run(*TINY, "--batch", "8", "--layouts", "dp", "fsdp", "--topology", "v5e:2x2",
              "--json", str(tmp_path / "a.json"))
    rows = {row["layout"]: row for row in json.loads((tmp_path / "a.json").read_text())["rows"]}
    assert set(rows) == {"dp", "fsdp"} and "tpu-v5e roofline" in out and "fits 16 GiB" in out
    assert rows["dp"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert rows["fsdp"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    for row in rows.values():
        assert row["chip"] == "tpu-v5e" and row["fits"] is True and 0 < row["peak_bytes"] <= row["hbm_bytes"]
        assert row["memory"]["argument_bytes"] > 0 and row["cost"]["flops"] > 0
        assert 0 < row["predicted"]["mfu"] <= 1 and row["predicted"]["step_s"] > 0
    assert rows["dp"]["collectives"]["all-reduce"]["count"] >= 1
    assert rows["fsdp"]["collectives"]["all-gather"]["count"] >= 1
    assert rows["dp"]["memory"]["argument_bytes"] > rows["fsdp"]["memory"]["argument_bytes"]


@needs_libtpu
def test_layouts_that_do_not_fit_a_topology_are_explained(monkeypatch):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as in run(): load libtpu beside another user
    cfg = configs.gpt("gpt2-small", num_heads=4, d_model=32, d_ff=64, vocab_size=64)
    devices = bench.topology_devices("v5p:8x8x8")
    assert _script().misfit(cfg, "fsdp", 512, devices) is None
    assert "physical mesh" in _script().misfit(cfg, "fsdp_tp", 512, devices)  # tensor=2 splits no 8-chip axis
