"""Benchmark one train step of a GPT or ViT preset, or of an image + text model of one of each,
under each sharding layout, as a markdown table.

    python experiments/bench_sharding.py --preset gpt2-small --set num_layers=2 [--layouts dp fsdp]
        [--batch 8] [--grad-accum 1] [--repeats 3] [--chip tpu-v5e] [--json PATH] [--plot PATH]
    JAX_PLATFORMS=cpu python experiments/bench_sharding.py --topology v5p:8x8x8 --preset gpt3-175b \
        --layouts fsdp fsdp_tp --batch 512 --set remat=full
    python experiments/bench_sharding.py --method ppo --preset gpt2-small --set num_layers=2 --batch 8 \
        [--prompt-tokens 32] [--response-tokens 32] [--topology v5e:4x4]
    python experiments/bench_sharding.py --method caption --preset gpt2-small --vision vit-b/16 \
        --set text.num_layers=2 --set vision.num_layers=2 [--topology v5e:2x2]
    python experiments/bench_sharding.py --method contrastive --preset gpt2-small --vision vit-b/16 \
        --set text.context_length=64 --set embed_dim=256 --layouts dp fsdp

Each row compiles the step (GPT-3's AdamW, as the experiments train) on a mesh of every available
device, then times it: one warm-up step, then the median of --repeats steps on random inputs.
Memory is XLA's per-device compile-time analysis (arguments, outputs, temps); collectives are
counted in the compiled HLO (ops run per step, MiB of their per-device results). MFU divides
model FLOPs by the devices' peak (measured by a matmul on CPU). Layouts whose axes do not divide
the devices, the batch, the heads, d_ff or the vocabulary are skipped with a note. On one CPU,
simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=8 and shrink the model
with --set.

--chip adds zoo.bench's roofline for that chip: the whole step's XLA FLOPs (recomputation
included) at the chip's peak, its bytes accessed at HBM bandwidth and its collectives' link bytes
(ring algorithms) at interconnect bandwidth; the slowest bounds the step, and model FLOPs over
that step time at peak is the MFU it allows.

--topology (AOT mode, needs libtpu: pip install "zoo[tpu]") compiles the step for the abstract
chips of a TPU topology such as v5e:2x2, v4:4x4x4 or v5p:8x8x8 without a TPU and runs nothing:
per-chip memory against the chip's HBM (fits), the step's cost and collectives, and the roofline
on the chip the topology names.

--method ppo compiles one InstructGPT PPO-ptx iteration of a GPT preset instead (zoo.bench's
compile_ppo_step: rollout, scoring, minibatch updates), locally or for --topology, and runs
nothing: per-device memory, split into the trained state (policy and value model with their AdamW
moments) and the frozen models (SFT reference and reward model), beside XLA's arguments, temps
and peak.

--method caption and --method contrastive train the image + text models (zoo.tasks.image_captioning,
zoo.tasks.contrastive) on random images and texts: --preset names the text tower's GPT preset,
--vision the image tower's ViT preset, and --set keys are dotted (text.num_layers=2,
vision.image_size=64; embed_dim=256 for the two towers' shared space). The image-to-text decoder
reads the image tokens, then the rest of its context_length as text; the two-tower model's text
tower reads context_length tokens. Layouts whose tensor axis does not divide either tower's heads
or d_ff, or the text vocabulary, are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from zoo import bench, configs, sharding
from zoo.models.gpt import GPTConfig
from zoo.models.image_to_text import ImageToTextConfig
from zoo.models.two_tower import TwoTowerConfig
from zoo.report import HelpFormatter, fmt, markdown_table, settings

MiB = 2**20
IMAGE_TEXT = {"caption": ImageToTextConfig, "contrastive": TwoTowerConfig}  # --method: the model's config
DEFAULT_VISION = "vit-b/16"  # their image tower
SHORT = {
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-reduce": "AR",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    presets = [*configs.GPT_PRESETS, *configs.VIT_PRESETS]
    parser.add_argument(
        "--preset",
        default="gpt2-small",
        choices=presets,
        metavar="PRESET",
        help=f"a GPT or ViT preset (the text tower's GPT preset with --method caption or contrastive): "
        f"{', '.join(presets)}",
    )
    parser.add_argument(
        "--vision",
        choices=list(configs.VIT_PRESETS),
        metavar="PRESET",
        help=f"with --method caption or contrastive: the image tower's ViT preset (default {DEFAULT_VISION})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config field, e.g. --set num_layers=2, or a tower's: --set text.num_layers=2 "
        "(repeatable)",
    )
    parser.add_argument(
        "--layouts", nargs="+", default=list(sharding.LAYOUTS), help="layout names or mesh specs such as data=2,fsdp=-1"
    )
    parser.add_argument("--batch", type=int, default=8, help="global batch in rows")
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per step: the batch's gradient accumulates over this many",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per layout (median reported)")
    parser.add_argument(
        "--chip",
        choices=list(bench.CHIPS),
        help="also predict each layout's step time and MFU on this chip by the roofline",
    )
    parser.add_argument(
        "--topology",
        metavar="NAME",
        help="compile ahead of time for this TPU topology's chips (e.g. v5p:8x8x8) instead of running",
    )
    parser.add_argument(
        "--method",
        choices=("pretrain", "ppo", *IMAGE_TEXT),
        default="pretrain",
        help="the step: a pretraining train step, a PPO iteration's memory (GPT presets; compiled, not run), "
        "or a train step of the image-to-text (caption) or two-tower (contrastive) model",
    )
    parser.add_argument("--prompt-tokens", type=int, default=32, help="with --method ppo: tokens of each prompt")
    parser.add_argument(
        "--response-tokens", type=int, default=32, help="with --method ppo: tokens of each sampled response"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="also draw step time and per-device memory as a PNG")
    args = parser.parse_args(argv)
    if args.topology and (args.chip or args.plot):
        parser.error("--topology names its chip and times nothing: drop --chip and --plot")
    if args.method in IMAGE_TEXT:
        if args.preset not in configs.GPT_PRESETS:
            parser.error(
                f"--method {args.method}: --preset names the text tower's GPT preset, and {args.preset!r} is not "
                "one; name the image tower's ViT preset with --vision"
            )
        args.vision = args.vision or DEFAULT_VISION
        try:
            model_config(args.preset, args.set, args.method, args.vision)
        except (ValueError, TypeError) as error:  # e.g. no text left in the decoder's context after the image
            parser.error(f"--method {args.method}: {error}")
    elif args.vision:
        parser.error("--vision names the image tower of --method caption or contrastive")
    if args.method == "ppo":
        if args.preset not in configs.GPT_PRESETS:
            parser.error(f"--method ppo trains a GPT policy; {args.preset!r} is not a GPT preset")
        if args.chip or args.plot or args.grad_accum != 1:
            parser.error("--method ppo times nothing and accumulates nothing: drop --chip, --plot and --grad-accum")
    return args


def model_config(
    preset: str, assignments: list[str], method: str = "pretrain", vision: str = DEFAULT_VISION
) -> bench.ModelConfig:
    """The preset's config with the --set overrides applied; for an image + text `method`, the model
    of the text tower `preset` and the image tower `vision`, the overrides on the combined config."""
    if method in IMAGE_TEXT:
        base = IMAGE_TEXT[method](vision=configs.VIT_PRESETS[vision], text=configs.GPT_PRESETS[preset])
    else:
        base = configs.GPT_PRESETS.get(preset) or configs.VIT_PRESETS[preset]
    return configs.override(base, assignments)


def misfit(
    cfg: bench.ModelConfig, layout: str, batch: int, devices: list | None = None, accumulation_steps: int = 1
) -> str | None:
    """Why `layout` cannot run this model and batch (of `accumulation_steps` micro-batches) on `devices`
    (default: the available ones; None: it can)."""
    if batch % accumulation_steps:
        return f"batch={batch} does not split into {accumulation_steps} micro-batches"
    try:
        mesh = sharding.mesh_for(layout, devices)
    except ValueError as error:
        return str(error)
    batch_shards, tensor = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["tensor"]
    sizes = {"micro-batch": (batch // accumulation_steps, batch_shards, "data x fsdp")}
    image_text = isinstance(cfg, ImageToTextConfig | TwoTowerConfig)
    towers = {"vision.": cfg.vision, "text.": cfg.text} if image_text else {"": cfg}
    for prefix, tower in towers.items():
        sizes[f"{prefix}num_heads"] = (tower.num_heads, tensor, "tensor")
        sizes[f"{prefix}d_ff"] = (tower.d_ff, tensor, "tensor")
        if isinstance(tower, GPTConfig):
            sizes[f"{prefix}vocab_size"] = (tower.vocab_size, tensor, "tensor")
    bad = [
        f"{name}={size} is not a multiple of {axes}={shards}"
        for name, (size, shards, axes) in sizes.items()
        if size % shards
    ]
    return f"mesh {dict(mesh.shape)}: {'; '.join(bad)}" if bad else None


def measure(
    cfg: bench.ModelConfig,
    layout: str,
    batch: int,
    repeats: int,
    topology: str | None,
    with_cost: bool,
    accumulation_steps: int = 1,
    ppo_tokens: tuple[int, int] | None = None,
) -> dict:
    """One layout's row (compiled for `topology`'s chips when given, else run here; given `ppo_tokens`,
    (prompt, response) tokens, a PPO iteration compiled only), or a note of why it was skipped."""
    reason = misfit(cfg, layout, batch, bench.topology_devices(topology) if topology else None, accumulation_steps)
    if reason:
        return {"layout": layout, "skipped": reason}
    print(f"{'compiling' if topology or ppo_tokens else 'measuring'} {layout}", file=sys.stderr, flush=True)
    try:
        if ppo_tokens:
            return bench.ppo_layout(cfg, layout, batch, topology, *ppo_tokens)
        if topology:
            return bench.aot_layout(cfg, layout, batch, topology, accumulation_steps)
        return bench.measure_layout(cfg, layout, batch, repeats, with_cost, accumulation_steps)
    except ValueError as error:  # e.g. a dimension the rules shard that the mesh does not divide
        return {"layout": layout, "skipped": str(error).splitlines()[0]}
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"layout": layout, "skipped": f"does not fit: {str(error).splitlines()[0]}"}


def mib(value: int | None) -> float | None:
    """Bytes as MiB (None stays None)."""
    return None if value is None else value / MiB


def collective_cell(found: dict[str, dict[str, int]]) -> str:
    """E.g. "AG 38 × 0.14, AR 7 × 0.08": count and MiB per kind that occurs."""
    return (
        ", ".join(f"{SHORT[kind]} {c['count']} × {c['bytes'] / MiB:.2f}" for kind, c in found.items() if c["count"])
        or "none"
    )


def throughput(per_s: float) -> str:
    """Items per second: whole numbers from 100 up, two decimals below (a big model on CPU)."""
    return fmt(per_s, 0 if per_s >= 100 else 2)


def table(rows: list[dict], item_name: str, chip: str | None) -> str:
    """The measured rows (and, with a chip, their roofline predictions) as a markdown table."""
    header = [
        "layout",
        "mesh (data, fsdp, tensor)",
        "compile (s)",
        "step (ms)",
        f"{item_name}/s",
        "MFU",
        "args (MiB)",
        "temps (MiB)",
        "outputs (MiB)",
        "collectives (count × MiB)",
    ]
    cells = [
        [
            row["layout"],
            ", ".join(map(str, row["mesh"].values())),
            fmt(row["compile_s"]),
            fmt(1e3 * row["step_s"], 1),
            throughput(row[f"{item_name}_per_s"]),
            fmt(row["mfu"], 4),
            fmt(mib(row["memory"]["argument_bytes"])),
            fmt(mib(row["memory"]["temp_bytes"])),
            fmt(mib(row["memory"]["output_bytes"])),
            collective_cell(row["collectives"]),
        ]
        for row in rows
    ]
    if chip:
        header += [f"{chip} roofline (ms)", "bound by", f"{chip} MFU bound"]
        for cell, row in zip(cells, rows):
            predicted = row["predicted"]
            cell += [fmt(ms(predicted["step_s"]), 3), fmt(predicted["bound"]), fmt(predicted["mfu"], 3)]
    return markdown_table(header, cells)


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds (None stays None)."""
    return None if seconds is None else 1e3 * seconds


def gib(value: float | None) -> float | None:
    """Bytes as GiB (None stays None)."""
    return None if value is None else value / 2**30


def aot_table(rows: list[dict]) -> str:
    """Rows compiled for a topology's chips as a markdown table: per-chip memory against HBM, the
    whole step's cost, collectives, and the roofline's time per resource, step time and MFU."""
    chip = rows[0]["chip"]
    header = [
        "layout",
        "mesh (data, fsdp, tensor)",
        "compile (s)",
        "args (GiB)",
        "temps (GiB)",
        "peak (GiB)",
        f"fits {gib(rows[0]['hbm_bytes']):.0f} GiB",
        "TFLOPs",
        "HBM GB",
        "link GB",
        "collectives (count × MiB)",
        "compute (ms)",
        "HBM (ms)",
        "ICI (ms)",
        "step (ms)",
        "bound by",
        f"{chip} MFU",
    ]
    cells = []
    for row in rows:
        mem, flops, accessed = row["memory"], row["cost"]["flops"], row["cost"]["bytes_accessed"]
        link = sum(c["link_bytes"] for c in row["collectives"].values())
        predicted = row["predicted"]
        cells.append(
            [
                row["layout"],
                ", ".join(map(str, row["mesh"].values())),
                fmt(row["compile_s"], 1),
                fmt(gib(mem["argument_bytes"])),
                fmt(gib(mem["temp_bytes"])),
                fmt(gib(row["peak_bytes"])),
                {True: "yes", False: "NO", None: "n/a"}[row["fits"]],
                fmt(None if flops is None else flops / 1e12),
                fmt(None if accessed is None else accessed / 1e9),
                fmt(link / 1e9),
                collective_cell(row["collectives"]),
                *(fmt(ms(predicted[key]), 3) for key in ("compute_s", "memory_s", "interconnect_s", "step_s")),
                fmt(predicted["bound"]),
                fmt(predicted["mfu"], 3),
            ]
        )
    return markdown_table(header, cells)


def ppo_table(rows: list[dict]) -> str:
    """PPO rows as a markdown table: where each device's memory goes (the trained state, the frozen
    models) beside XLA's arguments, temps and peak, and with a topology whether the peak fits HBM."""
    header = [
        "layout",
        "mesh (data, fsdp, tensor)",
        "compile (s)",
        "trained: policy + value + AdamW (MiB)",
        "frozen: reference + reward (MiB)",
        "args (MiB)",
        "temps (MiB)",
        "peak (MiB)",
    ]
    cells = [
        [
            row["layout"],
            ", ".join(map(str, row["mesh"].values())),
            fmt(row["compile_s"], 1),
            fmt(mib(row["state_bytes"])),
            fmt(mib(row["constants_bytes"])),
            fmt(mib(row["memory"]["argument_bytes"])),
            fmt(mib(row["memory"]["temp_bytes"])),
            fmt(mib(row["peak_bytes"])),
        ]
        for row in rows
    ]
    if "chip" in rows[0]:
        header.append(f"fits {rows[0]['chip']} {gib(rows[0]['hbm_bytes']):.0f} GiB")
        for cell, row in zip(cells, rows):
            cell.append({True: "yes", False: "NO", None: "n/a"}[row["fits"]])
    return markdown_table(header, cells)


def plot(rows: list[dict], path: str) -> None:
    """Bar charts of step time and per-device memory per layout: arguments, temps, and the outputs
    beyond those that reuse donated arguments' buffers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["layout"] for row in rows]
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(10, 4))
    time_ax.bar(names, [1e3 * row["step_s"] for row in rows], color="tab:blue")
    time_ax.set_ylabel("step time (ms)")
    bottom = [0.0] * len(rows)
    parts = {
        "arguments": lambda m: m["argument_bytes"],
        "temps": lambda m: m["temp_bytes"],
        "outputs not aliased": lambda m: m["output_bytes"] - (m["alias_bytes"] or 0),
    }
    for label, size in parts.items():
        heights = [mib(size(row["memory"])) if row["memory"]["output_bytes"] is not None else 0.0 for row in rows]
        memory_ax.bar(names, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    memory_ax.set_ylabel("per-device memory (MiB)")
    memory_ax.legend()
    for ax in (time_ax, memory_ax):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Measure every layout, print the table and optionally write JSON and a plot."""
    args = parse_args(argv)
    cfg = model_config(args.preset, args.set, args.method, args.vision)
    item_name = "tokens" if isinstance(cfg, GPTConfig) else "images"
    ppo_tokens = (args.prompt_tokens, args.response_tokens) if args.method == "ppo" else None
    config = {"preset": args.preset, "overrides": args.set, "batch": args.batch}
    if args.method in IMAGE_TEXT:
        config |= {"method": args.method, "vision": args.vision, "text_tokens": bench.text_tokens(cfg)}
    if ppo_tokens:
        config |= {"method": "ppo", "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens}
    else:
        config |= {"grad_accum": args.grad_accum}
    if args.topology:
        config |= {
            "topology": args.topology,
            "chip": bench.topology_chip(args.topology),
            "devices": len(bench.topology_devices(args.topology)),
        }
    else:
        config |= {} if ppo_tokens else {"repeats": args.repeats}
        config |= {
            "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(),
        }
    print(settings(config), end="\n\n", flush=True)
    results = [
        measure(
            cfg, layout, args.batch, args.repeats, args.topology, args.chip is not None, args.grad_accum, ppo_tokens
        )
        for layout in args.layouts
    ]
    rows = [row for row in results if "skipped" not in row]
    for row in rows if args.chip else []:
        row["predicted"] = bench.predict(row, args.chip)
    if rows and ppo_tokens:
        print(ppo_table(rows))
    elif rows:
        print(aot_table(rows) if args.topology else table(rows, item_name, args.chip))
    for row in results:
        if "skipped" in row:
            print(f"\nskipped {row['layout']}: {row['skipped']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "rows": results}, f, indent=2)
    if args.plot and rows:
        plot(rows, args.plot)
    if not rows:
        sys.exit("no layout fits; see the notes above")


if __name__ == "__main__":
    main()
