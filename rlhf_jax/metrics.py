"""Run outputs: metrics.jsonl (one JSON object per log step), TensorBoard events, progress.

Only process 0 writes. On resume, records after the restored step are dropped
so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


def _scalar(v: Any) -> Any:
    v = np.asarray(v)
    if v.size != 1:
        raise ValueError(f"metric of shape {v.shape} is not a scalar")
    v = v.item()
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def _summary_writer_class():
    """tensorboardX's SummaryWriter (no TensorFlow needed), imported without PyTorch.

    tensorboardX imports torch whenever it is installed (as on Colab, or with the [parity] extra), only to
    accept torch tensors; we log Python floats, and that import costs ~2 s of every run's start. While
    tensorboardX loads, `import torch` fails as if torch were absent; a torch already imported is left alone.
    """
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        if tensorboard:
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, step)
        return record

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
