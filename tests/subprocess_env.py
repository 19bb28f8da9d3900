"""The experiment scripts as the tests run them: as a subprocess (its environment) or as a module."""

import importlib.util
import os
import pathlib
import re
from types import ModuleType

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def cpu_environment(devices: int = 8) -> dict[str, str]:
    """The test session's environment (its compilation cache and XLA flags, from conftest.py) on
    `devices` simulated CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip(),
    }


def experiment_module(name: str) -> ModuleType:
    """experiments/`name`.py loaded as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
