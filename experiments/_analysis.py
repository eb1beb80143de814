"""Analyses the pipeline ablations share: PPO curves read from a run's metrics, and Gao et al.'s fit.

Gao, Schulman & Hilton (2022), "Scaling Laws for Reward Model Overoptimization", eq. 2: with
d = sqrt(KL(π ‖ π_init)), the gold reward gained by RL is R(d) = d (α − β ln d). It rises, peaks at
d* = exp(α/β − 1) and falls: the proxy (the RM) keeps rewarding what the gold judge no longer does.
"""

from __future__ import annotations

import json
import os

import numpy as np


def ppo_curve(pipeline_dir: str, window: int = 10, proxy_key: str = "objective/scores") -> dict[str, np.ndarray]:
    """Per PPO iteration of a pipeline run, averaged over `window` iterations (one batch is noisy):
    step, kl (nats per response, k1 estimate), d = sqrt(max(kl, 0)), gold (the gold judge, logged as
    objective/monitor_score) and proxy (`proxy_key`: the reward PPO optimised, objective/scores, or e.g. an RM
    ensemble's members' mean, objective/rm_mean). proxy_init is the
    first iteration's proxy alone: its rollouts come from the initial (SFT) policy, at d = 0."""
    path = os.path.join(pipeline_dir, "policy", "metrics.jsonl")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "objective/kl" in m and "objective/monitor_score" in m:
                rows.append((m["step"], m["objective/kl"], m["objective/monitor_score"], m[proxy_key]))
    if not rows:
        raise ValueError(f"{path}: no PPO iterations with objective/kl and objective/monitor_score logged.")
    a = np.asarray(rows, np.float64)
    proxy_init = np.asarray(a[0, 3])
    n = len(a) // window * window or len(a)
    w = window if len(a) >= window else len(a)
    a = a[:n].reshape(-1, w, 4).mean(1)
    return {
        "step": a[:, 0],
        "kl": a[:, 1],
        "d": np.sqrt(np.maximum(a[:, 1], 0.0)),
        "gold": a[:, 2],
        "proxy": a[:, 3],
        "proxy_init": proxy_init,
    }


def fit_gao(d: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
    """Least-squares (α, β) of gain = d (α − β ln d), a model linear in α and β; points with d = 0 carry
    no information (both sides are 0) and are dropped."""
    d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
    keep = d > 0
    if keep.sum() < 2:
        raise ValueError("fit_gao: need at least two points with d > 0.")
    d, gain = d[keep], gain[keep]
    design = np.stack([d, -d * np.log(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
    return float(alpha), float(beta)


def gao_peak(alpha: float, beta: float) -> float:
    """d* where d (α − β ln d) is largest (β > 0); inf when the fit never turns down."""
    return float(np.exp(alpha / beta - 1.0)) if beta > 0 else float("inf")


def policy_stage_seconds(run_dir: str) -> float | None:
    """Wall seconds of a pipeline run's policy stage: its DONE.json's wall_s, else (runs from before that
    record) the gap between the "<policy>: running" and "evaluation: running" lines of the sweep.log of the
    run that trained it (stages.json says which run that was, when this one reused it). None if unknown."""
    import re

    where = os.path.join(run_dir, "policy")
    stages = os.path.join(run_dir, "stages.json")
    if os.path.isfile(stages):
        with open(stages) as f:
            where = json.load(f).get("policy", where)
    done = os.path.join(where, "DONE.json")
    if os.path.isfile(done):
        with open(done) as f:
            wall = json.load(f).get("wall_s")
        if wall is not None:
            return float(wall)
    log = os.path.join(os.path.dirname(where), "sweep.log")
    if not os.path.isfile(log):
        return None
    stamp = lambda line: sum(int(x) * m for x, m in zip(line[1:9].split(":"), (3600, 60, 1)))
    start = end = None
    with open(log) as f:
        for line in f:
            if re.match(r"\[\d\d:\d\d:\d\d\] pipeline: ", line):
                if line.rstrip().endswith(f"running in {where}"):
                    start = stamp(line)
                elif start is not None and "pipeline: evaluation: running in" in line:
                    end = stamp(line)
    return None if start is None or end is None else float((end - start) % 86400)
