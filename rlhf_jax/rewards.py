"""Every reward source behind one interface — a trained RM, an ensemble of RMs, a Python function of the
decoded text — and the built-in Python reward functions.

A source scores a rollout (rlhf_jax.rollout.Rollout) in two halves, so that an RM's forward compiles into
the policy-gradient stage's jitted scoring while a Python function runs on the host:

    from_host = reward.on_host(rollout)                           # host work (decode, call), or None
    scores = reward.on_device(reward.params, rollout, from_host)  # jittable: the RM's forward, or from_host
    scores = reward(rollout)                                      # both, the device half jitted (online DPO)

`Scores.score` [B] is what the policy is trained on: an RM's normalised score, an ensemble's members
combined by config.reward.aggregate (preference.aggregate_rewards), or the function's value.

Python reward functions (config.reward.kind="function"; verifiable tasks, tests), as TRL users write them:

    fn(prompts: list[str], responses: list[str], tokens [B, N], mask [B, N], **columns) -> [B] floats

`columns` are the prompt records' other fields, one list entry per episode (an {"prompt", "answer"} JSONL
gives answer=[...]): a function receives those its signature names, or all of them with **kwargs.
config.reward.function takes one "package.module:fn" or several joined by commas, summed with
config.reward.weights (empty: 1 each); each one's batch mean is logged as reward/<fn>. Processes without
JAX import them too (scripts/bench_trl.py scores TRL's samples with ours), so JAX and the rest of the
package are imported where a source needs them, not at the top.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from jax import Array

    from rlhf_jax.rollout import Rollout
    from rlhf_jax.run import Run


class Scores(NamedTuple):  # a pytree: it travels inside the Rollout through jitted functions
    score: Any  # f32 [B]: the reward the policy is trained on
    member_mean: Any = None  # f32 [B]: an RM's members' mean (one RM: its score)
    member_std: Any = None  # f32 [B]: their std (one RM: 0); what aggregate="lcb" or "min" trades off
    parts: Any = None  # f32 [B, F]: each reward function's value (score = parts · weights)


class RewardSource:
    """The interface. `params`: the device arrays on_device reads (an RM's), or None."""

    params = None

    def on_host(self, rollout: Rollout) -> Array | None:
        return None

    def on_device(self, params, rollout: Rollout, from_host: Array | None) -> Scores:
        raise NotImplementedError

    def __call__(self, rollout: Rollout) -> Scores:
        if getattr(self, "_on_device", None) is None:
            import jax

            self._on_device = jax.jit(self.on_device)
        return self._on_device(self.params, rollout, self.on_host(rollout))


class RewardModel(RewardSource):
    """A trained RM (or an ensemble: params with a leading member axis), each member normalised by its
    reward_norm.json gain and bias, the members combined by `aggregate` (mean | lcb | min)."""

    def __init__(self, model, params, norm: dict, aggregate: str = "mean", lcb_coef: float = 1.0):
        self.model, self.params, self.norm, self.aggregate, self.lcb_coef = model, params, norm, aggregate, lcb_coef

    def on_device(self, params, rollout, from_host=None) -> Scores:
        from rlhf_jax import forward, preference, rollout as rollouts

        s = forward.member_scores(params, self.model, self.norm, *rollouts.joined(rollout))  # [E, B]
        return Scores(preference.aggregate_rewards(s, self.aggregate, self.lcb_coef), s.mean(0), s.std(0))


class RewardFunction(RewardSource):
    """Python functions of the decoded prompts and responses and of the prompt records' columns (module
    docstring), run on the host over every process's episodes and summed with `weights`; the parts come back
    as a global [B, F] array sharded over the batch. columns[i]: the fields of prompt record i
    (Rollout.prompt_index)."""

    def __init__(self, fns, tok, mesh, rules, key: str = "reward.function", weights=(), columns=None):
        self.fns = dict(fns)  # {name: fn}
        self.weights = np.asarray(weights or [1.0] * len(self.fns), np.float32)
        if len(self.weights) != len(self.fns):
            raise ValueError(
                f"config.reward.weights has {len(self.weights)} values for the {len(self.fns)} functions of "
                f"config.{key} ({', '.join(self.fns)}): give one weight each, or none for 1 each."
            )
        self.tok, self.mesh, self.rules, self.key, self.columns = tok, mesh, rules, key, columns

    @property
    def names(self) -> list[str]:
        return list(self.fns)

    def on_host(self, rollout) -> Array:
        import jax

        from rlhf_jax import parallel, rollout as rollouts

        p_text, r_text = rollouts.decode(self.tok, rollout)
        tokens, mask = parallel.to_host(rollout.response), parallel.to_host(rollout.response_mask)
        columns = self.episode_columns(rollout)
        parts = []
        for name, fn in self.fns.items():
            scores = np.asarray(fn(p_text, r_text, tokens, mask, **self.arguments(name, fn, columns)), np.float32)
            if scores.shape != (len(r_text),):
                raise ValueError(f"config.{self.key}: {name} returned shape {scores.shape}; expected ({len(r_text)},).")
            parts.append(scores)
        return jax.device_put(np.stack(parts, 1), parallel.batch_sharding(self.mesh, self.rules, 2))

    def on_device(self, params, rollout, from_host) -> Scores:
        import jax.numpy as jnp

        return Scores(from_host @ jnp.asarray(self.weights), parts=from_host)

    def episode_columns(self, rollout) -> dict[str, list]:
        """{field: [its value for each episode's prompt record]} ({} without columns or prompt indices)."""
        from rlhf_jax import parallel

        if not self.columns or rollout.prompt_index is None:
            return {}
        index = parallel.to_host(rollout.prompt_index)
        fields = sorted({k for r in self.columns for k in r})
        return {k: [self.columns[int(i)].get(k) for i in index] for k in fields}

    def arguments(self, name: str, fn, columns: dict[str, list]) -> dict[str, list]:
        """The columns fn's signature asks for: those it names after (prompts, responses, tokens, mask), or all
        of them with **kwargs; a named one the prompts do not have (and without a default) is an error."""
        params = list(inspect.signature(fn).parameters.values())[4:]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return columns
        missing = [p.name for p in params if p.name not in columns and p.default is p.empty]
        if missing:
            raise ValueError(
                f"config.{self.key}: {name} takes {missing}, but the prompt records have "
                f"{sorted(columns) or 'no fields besides their text'}: add the field to every record of "
                f'config.data.prompts_path (e.g. {{"prompt": ..., "{missing[0]}": ...}}), or give it a default.'
            )
        return {p.name: columns[p.name] for p in params if p.name in columns}


def part_means(reward: RewardSource, scores: Scores) -> dict[str, float]:
    """{"reward/<fn>": its batch mean, before its weight} for each function of a RewardFunction, else {}."""
    if scores.parts is None:
        return {}
    from rlhf_jax import parallel

    return {f"reward/{n}": float(p.mean()) for n, p in zip(reward.names, parallel.to_host(scores.parts).T)}


def source(run: Run, c, tok, columns=None) -> RewardSource:
    """config.reward as a source: reward.kind="rm" (reward.rm_workdir, one RM or an ensemble) or "function"
    (reward.function, reward.weights; columns: the prompt records' fields, rollout.prompt_data); its settings
    checked against each other and the RM."""
    from rlhf_jax import preference

    if c.reward.aggregate not in preference.AGGREGATES:
        raise ValueError(f"config.reward.aggregate={c.reward.aggregate!r}: use one of {preference.AGGREGATES}.")
    if c.reward.lcb_coef < 0:
        raise ValueError(f"config.reward.lcb_coef={c.reward.lcb_coef} must be >= 0 (the reward is mean − λ·std).")
    if c.reward.kind == "rm":
        if not c.reward.rm_workdir:
            raise ValueError(
                "config.reward.rm_workdir is empty: set it to a trained RM's --workdir, "
                "or use --config.reward.kind=function with config.reward.function=module:fn."
            )
        from rlhf_jax.trained import load_reward_model

        rm_model, rm_params, norm = load_reward_model(c.reward.rm_workdir, run.mesh, run.rules, c.model.dtype)
        if c.reward.aggregate != "mean" and norm["ensemble_size"] == 1:
            raise ValueError(
                f"config.reward.aggregate={c.reward.aggregate!r} combines an RM ensemble's members, but "
                f"{c.reward.rm_workdir} is one RM (for which it equals its score). Train an ensemble "
                f"(--config.rm.ensemble_size=4) or use reward.aggregate='mean'."
            )
        run.log(
            f"reward: {c.reward.rm_workdir}"
            + (f", {c.reward.aggregate} of an ensemble of {norm['ensemble_size']}" if norm["ensemble_size"] > 1 else "")
        )
        return RewardModel(rm_model, rm_params, norm, c.reward.aggregate, c.reward.lcb_coef)
    if c.reward.aggregate != "mean":
        raise ValueError(
            f"config.reward.aggregate={c.reward.aggregate!r} applies to an RM ensemble; "
            f"reward.kind={c.reward.kind!r} has none. Use reward.aggregate='mean'."
        )
    if c.reward.kind == "function":
        fns = import_functions(c.reward.function, "reward.function")
        reward = RewardFunction(fns, tok, run.mesh, run.rules, weights=tuple(c.reward.weights), columns=columns)
        if len(fns) > 1:
            run.log("reward: " + " + ".join(f"{w:g}·{n}" for w, n in zip(reward.weights, reward.names)))
        return reward
    raise ValueError(f"config.reward.kind={c.reward.kind!r}: use 'rm' or 'function'.")


def monitor(run: Run, c, tok, columns=None) -> RewardFunction | None:
    """config.reward.monitor: a second Python score, only logged (objective/monitor_score), or None."""
    if not c.reward.monitor:
        return None
    fns = import_functions(c.reward.monitor, "reward.monitor")
    return RewardFunction(fns, tok, run.mesh, run.rules, "reward.monitor", columns=columns)


def import_functions(specs: str, key: str) -> dict:
    """'package.module:fn' or several joined by commas → {name: function}; a name met twice gets its place."""
    specs = [x.strip() for x in specs.split(",") if x.strip()]
    if not specs:
        raise ValueError(f"config.{key} is empty: give 'package.module:function' (several: joined by commas).")
    names = [x.rpartition(":")[2] for x in specs]
    return {
        (n if names.count(n) == 1 else f"{n}_{i}"): import_function(x, key)
        for i, (n, x) in enumerate(zip(names, specs))
    }


def import_function(spec: str, key: str):
    """'package.module:function' → the function."""
    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"config.{key}={spec!r} cannot be imported ({e}); give it as 'package.module:function'."
        ) from e


# --- Python reward functions -------------------------------------------------------------------------------------


def fraction_of_vowels(prompts, responses, tokens, mask) -> np.ndarray:
    """Share of vowels among a response's letters: a smooth toy objective for smoke tests."""
    out = []
    for r in responses:
        letters = [ch for ch in r.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / max(len(letters), 1))
    return np.asarray(out, np.float32)


def token_frequency(target_id: int):
    """A reward = share of response tokens equal to `target_id` (a learnable, verifiable objective)."""

    def fn(prompts, responses, tokens, mask) -> np.ndarray:
        mask = np.asarray(mask, np.float32)
        return ((np.asarray(tokens) == target_id) * mask).sum(1) / np.maximum(mask.sum(1), 1.0)

    return fn
