"""What a run reports: model FLOPs, MFU against the device's peak, and the metrics files
(JSON lines, TensorBoard events, a loss-curve PNG) that only the first process writes."""

from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from etils import epath

from zoo.models.gpt import GPTConfig
from zoo.models.vit import ViTConfig
from zoo.paths import write_atomically

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def gpt_flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token of a GPT (forward + backward = 3 x forward): 6 per weight of
    the matrices (the embedding as the output layer included) plus the attention logits and
    values, 12 · layers · d_model · keys seen (banded layers see at most `window` keys)."""
    per_layer = 4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff
    matrices = cfg.num_layers * per_layer + cfg.d_model * cfg.vocab_size
    return 6 * matrices + gpt_attention_flops_per_token(cfg)


def gpt_attention_flops_per_token(cfg: GPTConfig) -> float:
    """The attention logits and values' share of `gpt_flops_per_token`."""
    keys = [
        cfg.context_length if kind == "dense" else min(cfg.window, cfg.context_length) for kind in cfg.attention_pattern
    ]
    return 12 * cfg.d_model * sum(keys) * cfg.num_layers / len(keys)


def vit_flops_per_image(cfg: ViTConfig) -> float:
    """Training FLOPs per image of a ViT: 6 per weight per token (patch embedding and head
    neglected) plus bidirectional attention, 12 · layers · d_model · tokens per token."""
    tokens = cfg.num_positions
    per_layer = 4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff
    return tokens * (6 * cfg.num_layers * per_layer + 12 * cfg.num_layers * cfg.d_model * tokens)


@functools.cache
def device_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of one local device, where the figure comes from). Accelerators: the
    table above; CPUs: measured on a float32 2048² matmul."""
    kind = jax.local_devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak, f"{kind} data sheet"
    return _measured_matmul_flops(), f"{kind} measured"


def _measured_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(x).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class MetricsWriter:
    """JSON lines (metrics.jsonl) and TensorBoard events in the workdir, and the loss curve
    (loss.png) on close. Only process 0 writes; the others hold no files.

    Every file goes through epath, so the workdir may be a URL (gs://bucket/run) as well as a
    folder. Object stores cannot append to a file, so metrics.jsonl (a resumed run's earlier
    lines kept) is rewritten whole, atomically, at each write. tensorboardX can write to
    gs:// and s3:// only through clients of its own, so it writes its events to a local
    temporary folder, copied to workdir/tensorboard at each write (as far as its writer
    thread has got) and whole at close. loss.png is drawn in memory, then written."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None) -> None:
        self.workdir = epath.Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if self.enabled:
            (self.workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
            self._jsonl = self.workdir / "metrics.jsonl"
            self._records = self._jsonl.read_text() if self._jsonl.exists() else ""
            self._events = tempfile.TemporaryDirectory(prefix="zoo-tensorboard-")
            self._tensorboard = _summary_writer()(self._events.name)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalar metrics at a step."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self.enabled:
            self._records += json.dumps(record) + "\n"
            write_atomically(self._jsonl, self._records.encode())
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, float(value), step)
            self._tensorboard.flush()
            self._copy_events()

    def close(self) -> None:
        """Finish the event files and draw every *loss metric against the step."""
        if not self.enabled:
            return
        self._tensorboard.close()
        self._copy_events()
        self._events.cleanup()
        self.plot_losses()

    def _copy_events(self) -> None:
        """Copy the local event files to workdir/tensorboard."""
        for events in pathlib.Path(self._events.name).iterdir():
            (self.workdir / "tensorboard" / events.name).write_bytes(events.read_bytes())

    def plot_losses(self) -> None:
        """loss.png: every metric whose name ends in "loss", against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self._records.splitlines()]
        keys = sorted({k for r in records for k in r if k.endswith("loss")})
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        (self.workdir / "loss.png").write_bytes(png.getvalue())


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch where it is
    installed (2.5 s of every run's start-up) only to accept torch tensors, which the zoo never logs.
    A None in sys.modules makes `import torch` fail for that import alone."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
