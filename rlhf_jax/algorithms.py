"""The one list of algorithms, read from the configs: every configs/<file>.py that declares ALGORITHMS (name →
its settings over the file's stage config) and LABELS (name → its name in reports). The pipeline's
config.policy choices, the report's labels and the experiments' lists all come from here, so a new algorithm
is a loss (rl.register_policy_loss) plus an entry in a config file, or a new config file."""

from __future__ import annotations

import dataclasses
import glob
import os

from rlhf_jax import config
from rlhf_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str  # config.policy of the pipeline
    stage: str  # the stage that runs it, and the pipeline config's block for it: pg | dpo
    file: str  # configs/<file>.py
    label: str  # its name in reports (LABELS; the name itself without one)
    settings: dict  # ALGORITHMS[name]: overrides of the stage config


def algorithms() -> dict[str, Algorithm]:
    """Every configs/*.py ALGORITHMS entry by name, files in name order; a name declared twice is an error."""
    out = {}
    for path in sorted(glob.glob(os.path.join(config.CONFIG_DIR, "*.py"))):
        file = os.path.basename(path).removesuffix(".py")
        module = config.config_module(file)
        if not hasattr(module, "ALGORITHMS"):
            continue
        stage, labels = module.get_config().stage, getattr(module, "LABELS", {})
        for name, settings in module.ALGORITHMS.items():
            if name in out:
                raise ConfigError(
                    f"configs/{file}.py ALGORITHMS[{name!r}]: configs/{out[name].file}.py declares it too; "
                    f"an algorithm name is config.policy of the pipeline and must be unique."
                )
            out[name] = Algorithm(name, stage, file, labels.get(name, name), settings)
    return out


def of_stage(stage: str) -> tuple[str, ...]:
    """The names of the algorithms a stage runs (pg: the policy-gradient family; dpo: the DPO family)."""
    return tuple(a.name for a in algorithms().values() if a.stage == stage)


def label(name: str) -> str:
    """The report's name for a config.policy (the name itself for one no config declares)."""
    known = algorithms()
    return known[name].label if name in known else name
