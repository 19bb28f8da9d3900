"""Test setup, before JAX starts: a simulated 8-device CPU mesh, and one persistent compilation
cache for the test session (the controller makes it; pytest-xdist workers and the experiments the
tests run as subprocesses inherit it), so a program compiled once is not compiled again."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's optimisations take most of a tiny test program's compile time (6.1 s -> 1.3 s to compile a
# small GPT's init without them) and buy nothing at these sizes.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Compiling for abstract TPU chips touches no TPU: let every test worker load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="zoo-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny test programs compile fast: keep all
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
