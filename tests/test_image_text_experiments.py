"""The image + text experiments end to end on synthetic images (no data ships with the tests): the
captioner from a frozen transformers ViT, the contrastive model from a zoo ViT run beside that run's
supervised accuracy, each on the simulated 8-device mesh."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from subprocess_env import EXPERIMENTS, experiment_module

from zoo import interop

TINY = ["--synthetic", "32", "--batch", "8", "--checkpoint-every", "0", "--log-every", "1"]


@pytest.fixture
def experiments(monkeypatch):
    """Import an experiment by name, its neighbours importable as they are when run as a script."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    return experiment_module


def saved_params(workdir) -> dict:
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        return manager.restore(manager.latest_step())["state"]["params"]


def test_captioning_from_a_frozen_transformers_vit_reports_exact_and_class_accuracy(tmp_path, capsys, experiments):
    transformers = pytest.importorskip("transformers", reason="the interop extra is not installed")
    vit_config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=10,
    )  # fmt: skip
    transformers.ViTForImageClassification(vit_config).save_pretrained(tmp_path / "vit")
    args = [*TINY, "--steps", "2", "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]
    args += ["--vision-from", str(tmp_path / "vit"), "--freeze", "vision", "--set", "text.num_layers=1"]
    args += ["--eval-images", "8", "--show", "2", "--json", str(tmp_path / "accuracy.json")]
    report = experiments("caption_fashion_mnist").main(args)
    out = capsys.readouterr().out
    assert set(report) == {"captions", "answers"}
    for accuracy in report.values():  # an exact caption or answer names its class
        assert 0 <= accuracy["exact"] <= accuracy["class"] <= 1
    assert json.loads((tmp_path / "accuracy.json").read_text())["captions"] == report["captions"]
    assert "| captions" in out and "image 1 (" in out and "Caption: ->" in out
    _, converted, _ = interop.from_transformers(tmp_path / "vit")
    encoder = saved_params(tmp_path / "run")["encoder"]
    assert "head" not in encoder
    np.testing.assert_array_equal(encoder["pos_embed"], converted["pos_embed"])  # frozen: as loaded
    np.testing.assert_array_equal(
        encoder["layers"]["block"]["mlp"]["up"]["kernel"], converted["layers"]["block"]["mlp"]["up"]["kernel"]
    )


def test_contrastive_training_from_a_zoo_vit_run_reports_zero_shot_beside_its_supervised_accuracy(
    tmp_path, capsys, experiments
):
    data = ["--data-dir", str(tmp_path / "data")]
    vit_run = str(tmp_path / "vit")
    experiments("vit_fashion_mnist").main([*TINY, *data, "--steps", "1", "--workdir", vit_run, "--set", "num_layers=1"])
    args = [*TINY, *data, "--steps", "2", "--workdir", str(tmp_path / "run"), "--loss", "clip"]
    args += ["--vision-from", vit_run, "--supervised", vit_run, "--set", "text.num_layers=1", "--retrieval-pairs", "16"]
    report = experiments("contrastive_fashion_mnist").main(args)
    out = capsys.readouterr().out
    assert set(report["zero_shot"]) == {
        "a photo of {a} {noun}",
        "an image of {a} {noun}",
        "a picture of {a} {noun}",
        "{A} {noun}.",
    }
    for value in [*report["zero_shot"].values(), report["supervised"], report["image_to_text_recall@1"]]:
        assert 0 <= value <= 1
    assert '"a photo of a {label}"' in out and "supervised ViT" in out and "recall@1" in out
