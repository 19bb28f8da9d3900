"""Experiments run end to end from the command line (tiny settings), and say what they take."""

import json
import math
import pathlib
import re
import subprocess
import sys

import pytest
from subprocess_env import cpu_environment, experiment_module

import zoo
from zoo import sharding
from zoo.data import shakespeare
from zoo.data.text import prepare_corpus

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = "--set num_layers=2 --set d_model=32 --set num_heads=2 --set d_ff=64".split()


def run(script: str, *args: str, devices: int = 1) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_environment(devices),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def dirs(tmp_path: pathlib.Path) -> list[str]:
    """--workdir and --data-dir in the test's temporary folder."""
    return ["--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]


TRAINING = ("--workdir", "--mesh", "--steps", "--batch", "--set", "--seed", "--lr", "--warmup")
TEXT = (*TRAINING, "--text-dir", "--tfds", "--tokenizer", "--data-dir")
FLAGS_USERS_NEED = {
    "default.py": TEXT,
    "gpt3.py": (*TEXT, "--preset"),
    "gpt2_small_openwebtext.py": TEXT,
    "vit_fashion_mnist.py": (*TRAINING, "--data", "--download", "--synthetic", "ZOO_DATA_DIR"),
    "vit_b16_imagenet.py": (*TRAINING, "--data-dir", "--mock"),
    "bench_attention.py": ("--lengths", "--windows", "--implementations", "--repeats", "--json"),
    "prepare_text.py": ("--tfds", "--text-dir", "--tokenizer", "--workers", "--data-dir"),
    "generate.py": ("--workdir", "--from-transformers", "--prompt", "--temperature", "--top-p", "--num-samples"),
    "bench_generate.py": ("--preset", "--batch-sizes", "--max-new-tokens", "--positions", "--peak-hbm-gbps", "--json"),
    "eval_incontext.py": ("--workdir", "--from-transformers", "--shots", "--limit", "--tasks", "--tfds", "--plot"),
    "self_consistency.py": (*TEXT, "--problems", "--held-out", "--k", "--temperature", "--plot"),
    "vit_lora.py": (*TRAINING, "--init-from", "--image-size", "--ranks", "--alpha", "--synthetic"),
    "gpt1_finetune.py": (*TRAINING, "--init-from", "--tasks", "--settings", "--lm-weight", "--lora-alpha", "--tfds"),
    "bench_tokenizers.py": ("--chinese", "--vocab-sizes", "--train-steps", "--train-vocab-size", "--json"),
    "bench_data.py": ("--scales", "--workers", "--batches", "--json"),
    "bench_input.py": ("--experiments", "--steps", "--prefetch", "--synthetic", "--json"),
    "instructgpt.py": (
        *TRAINING,
        "--init-from",
        "--sft-steps",
        "--rm-steps",
        "--k",
        "--ppo",
        "--kl-coef",
        "--ptx-coef",
    ),
    "chat.py": ("--workdir", "--message", "--system", "--temperature"),
    "caption_fashion_mnist.py": ("--data", "--synthetic", "--vision-from", "--text-from", "--freeze", "--eval-images"),
    "contrastive_fashion_mnist.py": ("--data", "--loss", "--supervised", "--vision-from", "--retrieval-pairs"),
    "bench_sharding.py": ("--preset", "--layouts", "--batch", "--chip", "--topology", "--json"),
    "bench_vs_pytorch.py": ("--batch", "--steps", "--set", "--torch-compile", "--json", 'pip install -e ".[interop]"'),
}
# Runs each experiment's --help in one process (one start-up of jax and tfds for all), with the
# optional extras (interop's torch and transformers, gcs's gcsfs) made unimportable.
HELP_WITHOUT_EXTRAS = """
import contextlib, io, json, runpy, sys
sys.modules.update(dict.fromkeys(["torch", "transformers", "gcsfs"]))
folder, scripts = sys.argv[1], sys.argv[2:]
sys.path.insert(0, folder)
results = {}
for script in scripts:
    sys.argv, out = [script, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(f"{folder}/{script}", run_name="__main__")
        results[script] = ["no exit", out.getvalue()]
    except SystemExit as stop:
        results[script] = [stop.code, out.getvalue()]
    except Exception as error:
        results[script] = [f"{type(error).__name__}: {error}", out.getvalue()]
print(json.dumps(results))
"""


def test_every_experiment_is_listed_here():
    assert set(FLAGS_USERS_NEED) == {path.name for path in (ROOT / "experiments").glob("*.py")}


def test_every_help_exits_0_names_the_flags_users_need_and_needs_no_extra():
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_EXTRAS, str(ROOT / "experiments"), *FLAGS_USERS_NEED],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_environment(devices=1),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    helps = json.loads(result.stdout.splitlines()[-1])
    for script, flags in FLAGS_USERS_NEED.items():
        code, text = helps[script]
        assert code == 0, f"{script} --help: {code}"
        assert text.startswith("usage:"), f"{script} --help printed {text[:200]!r}"
        assert [flag for flag in flags if flag not in text] == [], f"{script} --help lacks them"


def test_default_experiment_trains_evaluates_samples_and_fine_tunes(tmp_path, capsys, shakespeare_512):
    out = run(
        "default.py",
        *"--steps 3 --batch 2 --eval-batches 1 --samples 1 --sample-tokens 8 --vocab-size 512".split(),
        *["--workdir", str(tmp_path / "run"), "--data-dir", str(shakespeare_512)],
        *TINY,
        *"--set window=8".split(),
    )
    assert "validation loss" in out and "--- sample 1 ---\nROMEO." in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["num_layers"] == 2 and config["model"]["window"] == 8
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert (tmp_path / "run" / "loss.png").exists() and any((tmp_path / "run" / "tensorboard").iterdir())
    # the run loads back (saved on one device, laid out here over 8 under FSDP) and generates
    run_ = zoo.load(tmp_path / "run", sharding.mesh_for("fsdp=-1"))
    assert run_.step == 3 and run_.model.cfg.num_layers == 2
    prompt = run_.tokenizer.encode("ROMEO.")
    with sharding.sharding_context(sharding.mesh_for("fsdp=-1")):
        greedy = zoo.generate(run_.model, run_.params, [prompt], 6, stop_tokens=(run_.tokenizer.eos_id,))
    # generate.py prints the same continuation (run here, under the same layout)
    capsys.readouterr()
    experiment_module("generate").main(
        ["--workdir", str(tmp_path / "run"), "--prompt", "ROMEO.", "--temperature", "0", "--max-new-tokens", "6",
         "--mesh", "fsdp=-1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert f"ROMEO.{run_.tokenizer.decode(greedy[0].tolist())}" in out and "(step 3)" in out
    # GPT-1's fine-tuning starts from the run (one task, tiny: the settings' table, not their accuracy)
    out = run(
        "gpt1_finetune.py", "--init-from", str(tmp_path / "run"), "--workdir", str(tmp_path / "ft"),
        "--tasks", "same_play", "--settings", "lora:2", "--scale", "0.02", "--steps", "2", "--batch", "4",
        "--length", "32", "--json", str(tmp_path / "ft.json"),
    )  # fmt: skip
    (row,) = json.loads((tmp_path / "ft.json").read_text())
    assert row["setting"] == "lora:2" and "| same_play | lora:2 " in out and 0 <= row["accuracy"] <= 1
    assert 0 < row["trainable"] < zoo.lora.count(run_.params) / 20  # the adapters and the head
    assert (tmp_path / "ft" / "same_play" / "lora_2" / "adapters").is_dir()  # saved alone
    # InstructGPT's stages start from the run (tests/test_alignment.py trains each one sharded)
    out = run(
        "instructgpt.py", "--init-from", str(tmp_path / "run"), "--workdir", str(tmp_path / "rl"), "--prompts", "32",
        "--test-prompts", "8", "--rm-prompts", "8", "--k", "2", "--sft-steps", "2", "--rm-steps", "2", "--steps", "2",
        "--batch", "8", "--response-tokens", "6", "--ppo", "ppo_ptx", "--json", str(tmp_path / "rl.json"),
    )  # fmt: skip
    results = json.loads((tmp_path / "rl.json").read_text())
    assert set(results) == {"pretrained", "sft", "rm", "ppo_ptx"} and 0 <= results["rm"]["held_out_pair_accuracy"] <= 1
    assert 0 <= results["ppo_ptx"]["true_score"]["sampled"]["all"] <= 1 and (tmp_path / "rl" / "ppo.png").exists()
    assert "| ppo_ptx " in out and "pairwise accuracy" in out
    # chat.py talks to the PPO policy (zoo.load reads it beside the value model, with the chat tokens)
    experiment_module("chat").main(["--workdir", str(tmp_path / "rl" / "ppo_ptx"), "--message", "What is 2 + 3?"])
    assert capsys.readouterr().out.endswith("\n")


def test_gpt3_trains_any_preset_scaled_down_on_a_store_prepared_ahead(tmp_path, capfd, shakespeare_512):
    # the corpus's tfds build and tokenizer come from the shared --data-dir; the store is made here
    prepared = ["--data-dir", str(shakespeare_512), "--store-dir", str(tmp_path / "stores")]
    out = run("prepare_text.py", "--vocab-size", "512", "--workers", "2", *prepared)
    folder = re.search(r"--store (\S+)", out)[1]
    assert pathlib.Path(folder).parent == tmp_path / "stores"
    capfd.readouterr()
    again = prepare_corpus(shakespeare_512, 32, 512, store_dir=tmp_path / "stores")
    assert str(again.train.folder.parent) == folder and "tokenizing" not in capfd.readouterr().err
    out = run(
        "gpt3.py",
        *"--preset gpt3-medium --steps 2 --batch 2 --eval-batches 1 --samples 0 --store".split(),
        folder,
        *dirs(tmp_path),
        *"--set num_layers=2 --set d_model=32 --set num_heads=2".split(),
        *"--set d_ff=64 --set context_length=32 --set window=8".split(),
    )
    assert "validation loss" in out
    assert not (tmp_path / "data").exists()  # no corpus, tfds build or tokenizer was needed
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["dtype"] == "bfloat16" and config["model"]["attention_pattern"] == ["dense", "banded"]
    assert config["model"]["vocab_size"] == 512 and config["args"]["preset"] == "gpt3-medium"
    assert config["data"]["store"] == folder


def test_attention_benchmark_prints_a_table(tmp_path):
    out = run(
        "bench_attention.py", *"--lengths 64 --windows 8 --repeats 1".split(), "--json", str(tmp_path / "bench.json")
    )
    assert re.search(r"\|\s*64 \|\s*8 \|\s*banded \|", out), out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {row["implementation"] for row in rows} == {"dense", "banded"}


def test_tokenizer_benchmark_trains_the_default_model_and_reports_bits_per_byte(tmp_path):
    # one kind: each costs a run of default.py, and the other's is the same command with a tokenizer.json
    out = run(
        "bench_tokenizers.py",
        *"--kinds sentencepiece --vocab-sizes 512 --train-vocab-size 512 --train-steps 2 --set num_layers=2".split(),
        *"--set d_model=32 --set num_heads=2 --set d_ff=64 --set window=8 --workdir".split(),
        str(tmp_path / "work"),
        "--json",
        str(tmp_path / "bench.json"),
    )
    (model,) = json.loads((tmp_path / "bench.json").read_text())["models"]
    assert [run.name for run in (tmp_path / "work" / "runs").iterdir()] == ["Shakespeare-512-sentencepiece_BPE"]
    assert model["tokenizer"] == "sentencepiece BPE" and re.search(r"\| 512 +\| sentencepiece BPE +\| +2 \|", out)
    # the validation tokens the experiment printed (rows of 129): every whole batch of 16 rows is scored
    (tokens,) = [int(n.replace(",", "")) for n in re.findall(r"and ([\d,]+) validation tokens", out)]
    assert model["evaluated_tokens"] == tokens // 129 // 16 * 16 * 129
    plays = sum(len(shakespeare.works()[play].encode()) for play in shakespeare.VALIDATION_PLAYS)
    assert 0.97 * plays < model["evaluated_bytes"] <= plays
    assert f"validation loss {model['val_loss_per_token']:.3f} nats/token" in out
    assert model["bits_per_byte"] == pytest.approx(model["val_loss_per_token"] / math.log(2) * model["tokens_per_byte"])


def test_self_consistency_then_in_context_evaluation_of_its_run(tmp_path):
    workdir = str(tmp_path / "run")
    out = run(
        "self_consistency.py", "--steps", "2", "--batch", "4", "--eval-batches", "0", "--problems", "100",
        "--held-out", "3", "--k", "2", "--workdir", workdir, "--data-dir", str(tmp_path / "data"),
        "--json", str(tmp_path / "sc.json"), "--plot", str(tmp_path / "sc.png"), *TINY,
    )  # fmt: skip
    rows = json.loads((tmp_path / "sc.json").read_text())
    assert [(r["method"].split(" ")[0], r["k"]) for r in rows] == [
        ("greedy", 1),
        ("self-consistency", 2),
    ]
    assert "held-out problems (step 2)" in out and (tmp_path / "sc.png").exists()
    assert all(0 <= r["acc"] <= 1 for r in rows)
    problems = (tmp_path / "data" / "problems-100-3" / "train" / "0000.txt").read_text()
    assert problems.count("The answer is") == problems.count("Q: ") > 90
    out = run(
        "eval_incontext.py", "--workdir", workdir, "--shots", "0", "1", "--limit", "3", "--batch", "16",
        "--tasks", "arithmetic 2-digit +", "--json", str(tmp_path / "icl.json"),
    )  # fmt: skip
    results = json.loads((tmp_path / "icl.json").read_text())
    assert [(r["task"], r["shots"]) for r in results["tasks"]] == [("arithmetic 2-digit +", k) for k in (0, 1)]
    assert results["perplexity"]["bits_per_byte"] > 0 and "bits per byte" in out
