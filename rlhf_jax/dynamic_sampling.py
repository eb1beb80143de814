"""DAPO's dynamic sampling (Yu et al. 2025, §3.2): a prompt group whose G scores are all equal has advantage 0
under a group baseline, so it only dilutes the batch; drop it and draw more prompts until batch_size / G
informative groups are in hand (pg.dynamic_sampling, at most pg.dynamic_sampling_max_draws draws).

Shapes stay static: every draw is one ordinary batch (batch_size episodes, the same programs as without it),
and the batch the update sees is always batch_size episodes: the first informative groups in draw order,
topped up, when the cap is hit first, with the dropped groups in draw order (their advantage is exactly 0
under grpo / dr_grpo / rloo: they add no policy gradient, only their KL and entropy terms).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.rollout import Rollout

# Rollout fields that are per response token [B, N] (right-padded); prompt and prompt_mask are left-padded and
# every other field is per episode [B, ...].
TOKEN_FIELDS = ("response", "response_mask", "sampler_logprobs", "logprobs", "entropy", "values", "ref_logprobs")


def informative(scores: np.ndarray, group: int) -> np.ndarray:
    """bool [B / group]: whether each group's scores differ (rl.group_advantages' tie test, negated)."""
    s = np.asarray(scores).reshape(-1, group)
    return s.max(axis=1) != s.min(axis=1)


def choose(drawn: list[np.ndarray], n: int) -> list[tuple[int, int]]:
    """(draw, group) of the n groups to train on, given each draw's `informative` flags: the informative ones
    in draw order, then, when fewer than n were drawn, the dropped ones in draw order."""
    order = [(d, g) for d, flags in enumerate(drawn) for g in np.flatnonzero(flags)]
    order += [(d, g) for d, flags in enumerate(drawn) for g in np.flatnonzero(~flags)]
    return order[:n]


@functools.partial(jax.jit, static_argnums=(2,))
def assemble(draws: list[Rollout], rows, pad_id: int) -> Rollout:
    """The rows [B] (indices into the draws one after another) of the scored draws, each padded to the widest
    prompt (on the left) and response (on the right) among them, sharded over the batch axis as a draw is."""
    P = max(r.prompt.shape[1] for r in draws)
    N = max(r.response.shape[1] for r in draws)

    def widen(r: Rollout) -> Rollout:
        left = lambda x, v: jnp.pad(x, ((0, 0), (P - x.shape[1], 0)), constant_values=v)
        right = lambda x, v: jnp.pad(x, ((0, 0), (0, N - x.shape[1])), constant_values=v)
        tokens = {k: right(getattr(r, k), 0) for k in TOKEN_FIELDS if getattr(r, k) is not None}
        tokens["response"] = right(r.response, pad_id)
        return r.replace(prompt=left(r.prompt, pad_id), prompt_mask=left(r.prompt_mask, 0), **tokens)

    joined = jax.tree.map(lambda *x: jnp.concatenate(x), *[widen(r) for r in draws])
    take = lambda x: nn.with_logical_constraint(jnp.take(x, rows, axis=0), ("batch",) + (None,) * (x.ndim - 1))
    return jax.tree.map(take, joined)


def fill_batch(
    draw: Callable[[int], Rollout], judge: Callable[[Rollout], Rollout], group: int, max_draws: int, pad_id: int
) -> tuple[Rollout, dict[str, float]]:
    """Draws scored rollouts (draw(k), k = 0, 1, ...) until batch_size / group informative groups are in hand or
    max_draws are spent, judged on the scores the advantages read (judge(rollout).scores); returns the batch
    to train on (scored, not yet advantaged) and dynamic_sampling/* metrics: the share of drawn groups dropped
    for equal scores, the draws used, the share of the batch topped up with dropped groups, and the mean
    score over every drawn episode (the trained batch's objective/scores leaves the dropped ones out)."""
    draws, flags, scores = [], [], []
    for k in range(max_draws):
        draws.append(draw(k))
        scores.append(parallel.to_host(judge(draws[-1]).scores))
        flags.append(informative(scores[-1], group))
        if sum(int(f.sum()) for f in flags) >= len(flags[0]):
            break
    n = len(flags[0])  # groups per batch
    chosen = choose(flags, n)
    rows = np.concatenate([(d * n + g) * group + np.arange(group) for d, g in chosen]).astype(np.int32)
    batch = assemble(draws, rows, pad_id)
    kept = np.concatenate(flags)
    return batch, {
        "dynamic_sampling/dropped_frac": float(1.0 - kept.mean()),
        "dynamic_sampling/draws": len(draws),
        "dynamic_sampling/filled_frac": float(np.mean([not flags[d][g] for d, g in chosen])),
        "dynamic_sampling/drawn_scores": float(np.concatenate(scores).mean()),
    }
