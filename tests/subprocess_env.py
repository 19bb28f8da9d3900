"""The environment of a script the tests run as a subprocess."""

import os
import re


def cpu_environment(devices: int = 8) -> dict[str, str]:
    """The test session's environment (its compilation cache and XLA flags, from conftest.py) on
    `devices` simulated CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip(),
    }
