"""The LM head at the response's positions only, against the head at every position: one process, alternating.

    python scripts/bench_response_head.py [--model-dir models/smollm2] [--runs 4] [--dtype float32]

A GRPO-shaped batch (32 sequences: a 32-token left-padded prompt and a 32-token response) through the update's
loss, -mean(advantage · log π(response)), forward + backward: `forward.response_stats`, whose head runs from
position P-1 on (`token_stats(first=P-1)`), against the same trunk with the head and log-softmax over all 63
positions, sliced afterwards (the path before bcfc26a). Prints the loss and the largest gradient difference of
the two, XLA's temporaries for each compiled program, and each one's seconds per run (median).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default="models/smollm2")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax import forward, parallel
    from rlhf_jax.hf import load

    mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model, params = load.load_model(args.model_dir, mesh, parallel.DEFAULT_RULES, dtype=args.dtype)
    B, P, N = 32, 32, 32
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, 40000, (B, P)), jnp.int32)
    prompt_mask = jnp.ones((B, P), jnp.int32).at[:, :5].set(0)
    response = jnp.asarray(rng.integers(3, 40000, (B, N)), jnp.int32)
    response_mask = jnp.ones((B, N), jnp.int32)
    advantages = jnp.asarray(rng.normal(size=(B, N)), jnp.float32)

    def everywhere(p):  # the head and log-softmax at all P + N - 1 positions, then the response's slice
        tokens = jnp.concatenate([prompt, response], 1)[:, :-1]
        mask = jnp.concatenate([prompt_mask, response_mask], 1)[:, :-1]
        targets = jnp.concatenate([prompt[:, 1:], response], 1)
        return forward.token_stats(p, model, tokens, mask, targets, 0.7)["logprobs"][:, P - 1 :]

    def response_only(p):
        return forward.response_stats(p, model, prompt, prompt_mask, response, response_mask, 0.7)["logprobs"]

    grad = lambda fn: jax.jit(jax.value_and_grad(lambda p: -jnp.mean(fn(p) * advantages)))
    fns = {"head everywhere": grad(everywhere), "head at the response": grad(response_only)}
    (la, ga), (lb, gb) = (jax.block_until_ready(f(params)) for f in fns.values())
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
    print(f"loss {float(la):.6f} vs {float(lb):.6f}; largest gradient difference {diff:.2e}")
    times = {k: [] for k in fns}
    for _ in range(args.runs):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(params))
            times[k].append(time.perf_counter() - t)
    for k, f in fns.items():
        temp = f.lower(params).compile().memory_analysis().temp_size_in_bytes / 2**20
        runs = ", ".join(f"{x:.2f}" for x in times[k])
        print(f"{k:22s} {statistics.median(times[k]):6.2f} s (runs {runs}); XLA temporaries {temp:,.0f} MiB")


if __name__ == "__main__":
    main()
