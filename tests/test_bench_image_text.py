"""experiments/bench_sharding.py on the image + text models (--method caption, --method contrastive):
tiny towers run end to end on the 8 simulated devices. Machinery only, no timings. The AOT path
(--topology) is left to a manual run: a TPU compile of even these towers, twice (the step, then
zoo.bench.step_cost's loop-free copy, which the persistent cache cannot serve for abstract chips),
costs more than both local runs here."""

import json
import re

import numpy as np
import pytest
from subprocess_env import experiment_module

from zoo import bench

# A 16-pixel image is one 16-pixel patch and [CLS]: 2 image tokens, 6 text tokens in an 8-token decoder.
TOWERS = [
    *"--preset gpt2-small --vision vit-ti/16 --set vision.image_size=16".split(),
    *"--set text.num_layers=1 --set text.d_model=32 --set text.num_heads=4 --set text.d_ff=64".split(),
    *"--set text.context_length=8 --set text.vocab_size=64".split(),
    *"--set vision.num_layers=1 --set vision.d_model=32 --set vision.num_heads=4 --set vision.d_ff=64".split(),
]


def run(capsys: pytest.CaptureFixture, tmp_path, *args: str) -> tuple[str, dict]:
    """What bench_sharding.py prints with `args` and its JSON, run in this process (its 8 simulated devices)."""
    experiment_module("bench_sharding").main([*args, "--json", str(tmp_path / "rows.json")])
    return capsys.readouterr().out, json.loads((tmp_path / "rows.json").read_text())


def test_the_towers_presets_are_checked_before_anything_compiles(capsys):
    script = experiment_module("bench_sharding")
    for argv, message in [
        (
            "--method caption --preset vit-ti/16",
            "'vit-ti/16' is not one; name the image tower's ViT preset with --vision",
        ),
        ("--vision vit-ti/16", "--vision names the image tower of --method caption or contrastive"),
        ("--method caption --set text.context_length=197", "197 image tokens leave no room for text"),
        ("--method contrastive --set text.num_layer=2", "did you mean num_layers?"),
    ]:
        with pytest.raises(SystemExit):
            script.parse_args(argv.split())
        assert message in capsys.readouterr().err
    assert script.parse_args(["--method", "contrastive"]).vision == "vit-b/16"


def test_random_batches_fit_the_models_and_layouts_fit_both_towers():
    script = experiment_module("bench_sharding")
    caption = script.model_config("gpt2-small", TOWERS[5::2], "caption", "vit-ti/16")
    contrastive = script.model_config("gpt2-small", [*TOWERS[5::2], "text.vocab_size=60"], "contrastive", "vit-ti/16")
    assert bench.text_tokens(caption) == 6 and bench.text_tokens(contrastive) == 8
    batch = bench.workload(caption, 8).train_batch(0)
    assert batch["image"].shape == (8, 16, 16, 3) and batch["tokens"].shape == (8, 7)
    assert batch["tokens"].min() >= 0 and batch["tokens"].max() < 64
    assert batch["prompt_lengths"].min() >= 1 and batch["prompt_lengths"].max() <= 6
    # The loss covers the tokens after the prompt: from target prompt_length - 1 on.
    expected = np.arange(6) >= batch["prompt_lengths"][:, None] - 1
    np.testing.assert_array_equal(batch["loss_mask"], expected.astype(np.float32))
    batch = bench.workload(contrastive, 8).train_batch(0)
    assert batch["tokens"].shape == (8, 8) and batch["lengths"].min() >= 1 and batch["lengths"].max() <= 8
    assert script.misfit(caption, "fsdp_tp", 8) is None
    assert "vision.num_heads=4 is not a multiple of tensor=8" in script.misfit(caption, "tp", 8)
    assert "text.vocab_size=60 is not a multiple of tensor=8" in script.misfit(contrastive, "tp", 8)


def test_a_tiny_image_to_text_run_reports_dp_and_fsdp(tmp_path, capsys):
    method = "caption"  # the contrastive model's sharded step: test_multimodal.py (compiles are costly here)
    out, found = run(capsys, tmp_path, "--method", method, *TOWERS, *"--batch 8 --repeats 1 --layouts dp fsdp".split())
    assert found["config"]["method"] == method and found["config"]["vision"] == "vit-ti/16"
    rows = {row["layout"]: row for row in found["rows"]}
    assert "images/s" in out and re.search(r"\|\s+dp \|", out) and re.search(r"\|\s+fsdp \|", out)
    assert rows["dp"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert rows["fsdp"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for row in rows.values():
        assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["mfu"] > 0
    assert rows["fsdp"]["collectives"]["all-gather"]["count"] >= 1  # params gathered from their shards
    # The params and AdamW moments are split 8 ways under fsdp, whole on every device under dp.
    assert 2 * rows["fsdp"]["memory"]["argument_bytes"] < rows["dp"]["memory"]["argument_bytes"]
