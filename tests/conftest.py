"""Test setup, before JAX starts: a simulated 8-device CPU mesh, and one persistent compilation
cache for the test session (the controller makes it; pytest-xdist workers and the experiments the
tests run as subprocesses inherit it), so a program compiled once is not compiled again; and the
shipped Shakespeare prepared once for the session's language-model runs."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest
from filelock import FileLock

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's optimisations take most of a tiny test program's compile time (6.1 s -> 1.3 s to compile a
# small GPT's init without them) and buy nothing at these sizes; XLA:CPU's older loop emitters
# compile a small GPT's train step in two thirds of the time its MLIR fusion emitters take.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
        "--xla_cpu_use_fusion_emitters=false",
    ]
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compiling for abstract TPU chips touches no TPU: let every test worker load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="zoo-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny test programs compile fast: keep all
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(scope="session")
def shakespeare_512(tmp_path_factory, worker_id) -> pathlib.Path:
    """A --data-dir holding what the language-model experiments prepare at --vocab-size 512 on the
    shipped Shakespeare (its tfds build, the tokenizer trained on it and its token store), made once
    per test session: pytest-xdist's workers share it through their common temporary folder, under a
    lock. The runs given it only read it (tests/test_data.py tests the preparation and its caching)."""
    from zoo.data.text import prepare_shakespeare

    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    folder, done = root / "shakespeare-512", root / "shakespeare-512.done"
    with FileLock(root / "shakespeare-512.lock"):
        if not done.exists():
            prepare_shakespeare(folder, length=32, vocab_size=512)
            done.touch()
    return folder
