"""experiments/vit_lora.py end to end on random images at a tiny size: a base ViT trained, its position
embeddings interpolated to a new resolution, then LoRA and full fine-tuning compared in one table."""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from subprocess_env import cpu_environment

from zoo import adaptation
from zoo.models import vit
from zoo.runs import load_vit

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = "--set num_layers=1 --set d_model=32 --set num_heads=2 --set d_ff=64".split()
SMOKE = "--synthetic 64 --base-steps 2 --steps 2 --batch 16 --ranks 2 --image-size 14".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str]:
    """(the workdir, the printed output) of one tiny run of the experiment."""
    tmp = tmp_path_factory.mktemp("vit_lora")
    flags = [*SMOKE, *TINY, "--workdir", str(tmp / "run"), "--data-dir", str(tmp / "data")]
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "vit_lora.py"), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_environment(1),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", result.stdout


def table(out: str) -> dict[str, list[str]]:
    """The printed table's rows by their first cell, each as its other cells."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in rows[2:]}


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the LoRA run restored as saved: one CPU device
def test_the_table_compares_the_models_and_lora_changes_only_the_adapters_and_the_head(workdir):
    run, out = workdir
    assert "(28, 28) -> (14, 14): 64 test images" in out
    rows = table(out)
    assert list(rows) == ["interpolated, not fine-tuned", "LoRA r=2 alpha=16, head", "full fine-tuning"], out
    assert all(re.fullmatch(r"\d+\.\d\d%", cells[0]) for cells in rows.values()), out
    number = lambda row, column: int(rows[row][column].replace(",", ""))
    for column in (1, 2):  # trainable parameters, optimizer-state bytes
        assert 0 < number("LoRA r=2 alpha=16, head", column) < number("full fine-tuning", column), out
    # the LoRA run's final params against its start: the interpolated base, fresh adapters (B = 0)
    model, params, _ = load_vit(run / "base")
    _, start = vit.resize_position_embeddings(model.cfg, params, 14)
    with ocp.CheckpointManager(run / "lora-r2" / "checkpoints") as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    base, adapters = restored.state["params"]["base"], restored.state["params"]["lora"]
    changed = jax.tree.map(lambda new, old: not np.array_equal(new, old), base, start)
    assert changed == adaptation.where(start, r"^head/")
    factors = jax.tree_util.tree_leaves_with_path(adapters["modules"])
    assert all(np.abs(leaf).max() > 0 for path, leaf in factors if path[-1].key == "b")  # B starts at 0
    assert sum(path[-1].key == "b" for path, _ in factors) == 4  # attention's qkv and out, the MLP's up and down
