"""Sweep and ablation definitions; each file is one experiment for scripts/sweep.py.

A file declares

    BASE = "configs/<stage>.py:<preset>"      or "configs/pipeline.py:<preset>" (the whole recipe)
    SWEEP = [dict(...), ...]                  one dict of --config.<key>=<value> overrides per run
    FIXED = dict(...)                         optional: overrides every run shares
    COLUMNS = ("train/loss", ...)             optional: the metrics its summary table reports
    AVERAGE_LAST = 10                         optional: report each column's mean over its last 10
                                              logged values (noisy per-iteration RL metrics); default 1
    def analyze(root, rows) -> list[str]      optional: an analysis of the finished runs (a fit, a
                                              plot under root) as markdown lines for summary.md

and its docstring says what it reproduces and the command that runs it. `load_experiment` reads
one such file into runs (a unique name and the overrides of each), checking every key against
BASE's config before anything runs; scripts/sweep.py launches and summarises them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def product(axes: dict[str, Sequence[Any]] | None = None, **more: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, first axis slowest: one override dict per run.

    product({"optim.lr": [1e-3, 3e-3]}, seed=[0, 1])
    → [{"optim.lr": 1e-3, "seed": 0}, {"optim.lr": 1e-3, "seed": 1}, {"optim.lr": 3e-3, "seed": 0}, ...]
    """
    axes = {**(axes or {}), **more}
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"product: axis {key!r} needs a non-empty list of values, got {values!r}.")
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


DEFAULT_COLUMNS = {
    "pretrain": ("train/loss", "eval/loss"),
    "sft": ("train/loss", "eval/loss"),
    "rm": ("rm/loss", "rm/accuracy", "eval/rm/accuracy"),
    "pg": ("objective/scores", "objective/kl", "kl_coef"),
    "pipeline": ("sft/gold_score", "policy/gold_score", "policy/win_rate_vs_sft", "policy/kl", "rm/accuracy_vs_gold"),
}


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    swept: dict[str, Any]  # the overrides that set this run apart
    overrides: dict[str, Any]  # FIXED then swept: every --config.<key>=<value> it gets


@dataclasses.dataclass(frozen=True)
class Experiment:
    path: str
    name: str
    base: str  # "configs/<stage>.py:<preset>"
    stage: str  # a config.stage, or "pipeline"
    runs: list[Run]
    swept_keys: list[str]
    columns: tuple[str, ...]
    average_last: int = 1
    analyze: Callable[[str, list[dict[str, Any]]], list[str]] | None = None

    @property
    def module(self) -> str:
        return "rlhf_jax.pipeline" if self.stage == "pipeline" else "rlhf_jax.main"


def load_experiment(path: str) -> Experiment:
    """Imports experiments/<name>.py and checks every override key against BASE's config."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such experiment file; pass e.g. experiments/lr_sweep_tiny.py.")
    spec = importlib.util.spec_from_file_location(f"experiment_{_stem(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base, sweep = getattr(module, "BASE", None), getattr(module, "SWEEP", None)
    fixed, columns = getattr(module, "FIXED", {}), getattr(module, "COLUMNS", None)
    average_last = getattr(module, "AVERAGE_LAST", 1)
    analyze = getattr(module, "analyze", None)
    if analyze is not None and not callable(analyze):
        raise ValueError(f"{path}: analyze must be a function (root, rows) -> list of markdown lines.")
    if not isinstance(base, str) or not base:
        raise ValueError(f'{path}: BASE must be a string like "configs/pretrain.py:tiny", got {base!r}.')
    if not isinstance(sweep, list) or not sweep or not all(isinstance(s, dict) for s in sweep):
        raise ValueError(
            f"{path}: SWEEP must be a non-empty list of dicts of --config overrides, e.g. "
            f'[dict(seed=0), dict(seed=1)] or product({{"optim.lr": [1e-3, 3e-3]}}).'
        )
    if not isinstance(fixed, dict):
        raise ValueError(f"{path}: FIXED must be a dict of overrides every run shares, got {type(fixed).__name__}.")
    if not isinstance(average_last, int) or average_last < 1:
        raise ValueError(
            f"{path}: AVERAGE_LAST must be a positive int (logged values per column), got {average_last!r}."
        )
    config = _base_config(base, path)
    stage = "pipeline" if _stem(base.partition(":")[0]) == "pipeline" else config.stage
    for where, overrides in [("FIXED", fixed)] + [(f"SWEEP[{i}]", s) for i, s in enumerate(sweep)]:
        for key, value in overrides.items():
            if not _has_key(config, key):
                from rlhf_jax.config import RENAMED_WHY, renamed_key

                new = renamed_key(key)
                fix = (
                    f"It is {new!r} now ({RENAMED_WHY})."
                    if new and _has_key(config, new)
                    else "Check the spelling against that config file."
                )
                raise ValueError(f"{path}: {where} sets {key!r}, which is not a field of {base}. {fix}")
            cli_value(value, f"{path}: {where}[{key!r}]")
    names = run_names(sweep, path)
    runs = [Run(n, dict(s), {**fixed, **s}) for n, s in zip(names, sweep)]
    swept_keys = list(dict.fromkeys(k for s in sweep for k in s))
    return Experiment(
        path,
        _stem(path),
        base,
        stage,
        runs,
        swept_keys,
        tuple(columns) if columns else DEFAULT_COLUMNS.get(stage, ()),
        average_last,
        analyze,
    )


def _base_config(base: str, where: str):
    file, _, preset = base.partition(":")
    full = file if os.path.isabs(file) else os.path.join(ROOT, file)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{where}: BASE={base!r}: {full} does not exist; use a file in configs/.")
    spec = importlib.util.spec_from_file_location(f"sweep_base_{_stem(file)}", full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def cli_value(value: Any, where: str = "override") -> str:
    """How ml_collections' --config.<key>= flag reads `value` back."""
    if isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise ValueError(
        f"{where}: {value!r} ({type(value).__name__}) cannot be a command-line override; "
        f"use a number, string, bool or tuple."
    )


def run_names(sweep: list[dict[str, Any]], where: str = "SWEEP") -> list[str]:
    """A readable, unique directory name per override dict: the last part of each key unless two keys
    share it, e.g. {"optim.lr": 0.001, "seed": 1} → "lr=0.001,seed=1"; {} → "base"."""
    keys = list(dict.fromkeys(k for s in sweep for k in s))
    last = [k.split(".")[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    names = []
    for i, overrides in enumerate(sweep):
        name = ",".join(f"{short[k]}={_name_value(v)}" for k, v in overrides.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", name)
        if name in names:
            raise ValueError(
                f"{where}: SWEEP[{names.index(name)}] and SWEEP[{i}] both get the run name {name!r}; "
                f"make every run's overrides differ (values are shortened with %g)."
            )
        names.append(name)
    return names


def _name_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "-".join(_name_value(x) for x in v)
    return str(v)
