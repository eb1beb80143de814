"""One module per stage: `lm` (pretrain, sft), `rm`, `pg` (the policy-gradient family: PPO, GRPO, RLOO,
REINFORCE++), `dpo` (the direct preference family); each has `train_and_evaluate(config, workdir)` and none
imports another."""

from __future__ import annotations

import importlib

from rlhf_jax.errors import ConfigError

STAGE_MODULES = {
    "pretrain": "rlhf_jax.stages.lm",
    "sft": "rlhf_jax.stages.lm",
    "rm": "rlhf_jax.stages.rm",
    "pg": "rlhf_jax.stages.pg",
    "dpo": "rlhf_jax.stages.dpo",
}


def run_stage(config, workdir: str):
    """Runs (or resumes) config.stage in workdir and returns its last logged metrics. Importable from notebooks."""
    if config.stage not in STAGE_MODULES:
        raise ConfigError(f"config.stage={config.stage!r} is not a stage. Use one of {sorted(STAGE_MODULES)}.")
    return importlib.import_module(STAGE_MODULES[config.stage]).train_and_evaluate(config, workdir)
