"""What a run reports: model FLOPs, MFU against the device's peak, and the metrics files
(JSON lines, TensorBoard events, a loss-curve PNG) that only the first process writes."""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp

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


def gpt_flops_per_token(cfg) -> float:
    """Training FLOPs per token of a GPT (forward + backward = 3 x forward): 6 per weight of
    the matrices (the embedding as the output layer included) plus the attention logits and
    values, 12 · layers · d_model · keys seen (banded layers see at most `window` keys)."""
    per_layer = 4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff
    matrices = cfg.num_layers * per_layer + cfg.d_model * cfg.vocab_size
    keys = [cfg.context_length if kind == "dense" else min(cfg.window, cfg.context_length)
            for kind in cfg.attention_pattern]
    attention = 12 * cfg.d_model * sum(keys) * cfg.num_layers / len(keys)
    return 6 * matrices + attention


def vit_flops_per_image(cfg) -> float:
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
    (loss.png) on close. Only process 0 writes; the others hold no files."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
        self.workdir = pathlib.Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")
            self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalar metrics at a step."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self.enabled:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, float(value), step)

    def close(self) -> None:
        """Flush the files and draw every *loss metric against the step."""
        if not self.enabled:
            return
        self._jsonl.close()
        self._tensorboard.close()
        self.plot_losses()

    def plot_losses(self) -> None:
        """loss.png: every metric whose name ends in "loss", against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in (self.workdir / "metrics.jsonl").read_text().splitlines()]
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
        fig.savefig(self.workdir / "loss.png", dpi=100)
        plt.close(fig)
