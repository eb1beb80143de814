"""Run outputs: metrics.jsonl (one JSON object per log step), TensorBoard events, progress, and with
config.log.wandb=True a Weights & Biases run.

Only process 0 writes. On resume, records after the restored step are dropped
so the file reads as one uninterrupted run; the W&B run is the same one (its id is kept
in the workdir) and keeps the steps it already has.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from rlhf_jax.errors import ConfigError

WANDB_ID_FILE = "wandb_run_id"  # in the workdir: the W&B run a resumed run goes on with


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


def import_wandb():
    """wandb, imported only when config.log.wandb asks for it: it is not a dependency of the library."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "config.log.wandb=True needs the wandb package, which is not installed: run `pip install wandb`, "
            "or set config.log.wandb=False (metrics.jsonl and TensorBoard are written either way)."
        ) from None
    return wandb


def _wandb_run(workdir: str, config):
    """The W&B run of this workdir (config.log), given the config once; a workdir that already has one resumes
    it, so a restarted or preempted run keeps adding to the same charts."""
    log, id_path = config.log, os.path.join(workdir, WANDB_ID_FILE)
    run_id = None
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    run = import_wandb().init(
        project=log.wandb_project,
        entity=log.wandb_entity or None,
        name=log.wandb_name or os.path.basename(workdir),
        group=log.wandb_group or None,
        tags=list(log.wandb_tags) or None,
        id=run_id,
        resume="allow" if run_id else None,
        config=json.loads(json.dumps(config.to_dict(), default=str)),
    )
    with open(id_path, "w") as f:
        f.write(run.id)
    return run


class MetricWriter:
    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True, config=None):
        """config: the run's; with config.log.wandb=True the records also go to W&B."""
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = self._wandb = None
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
        if config is not None and config.log.wandb:
            self._wandb = _wandb_run(workdir, config)

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
            # A resumed W&B run starts after the last step it holds; the steps replayed from the checkpoint
            # before that are already there (W&B would drop them, warning each time).
            if self._wandb is not None and step >= self._wandb.starting_step:
                self._wandb.log(scalars, step=int(step))
        return record

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self):
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
