"""Where the benchmark's time goes, and how fast the hardware lets it go.

    python scripts/bench_profile.py [--task train|generate] [--dtype bfloat16|float32] [--trace_dir DIR]
    python scripts/bench_profile.py --task grpo [--model-dir models/smollm2] [--dtype float32]

For one workload of scripts/bench.py (same shape, same code path) this prints:
  1. the wall time of one run (best of 3, after warm-up);
  2. a jax.profiler trace of one run, its XLA:CPU thunks grouped by kind: `ynn_fusion`
     (dots handed to the YNNPACK matmul library), `dot` (dots XLA emits itself, e.g. the
     batched matrix-vector products of attention while decoding), and every other fusion;
  3. the matmul floor: the run's own GEMMs alone (every weight matmul of the model at the
     run's row count; for `train` forward, input-gradient and weight-gradient GEMMs), as a
     chain of plain jitted dots in JAX and, when torch is installed, as `@` in PyTorch.
     No implementation can do a run faster than the best of the two floors, so
     `torch seconds / floor` bounds the speed-up over PyTorch that any code could show.
The trace is kept in --trace_dir (open it with Perfetto or TensorBoard's profile plugin).

`--task grpo` profiles scripts/bench.py --only real's GRPO iteration on SmolLM2-135M (the pg stage itself,
configs/smollm2.py:rlvr at the benchmark's sizes): it runs 4 iterations, traces the fourth, and prints the
seconds of each step (generate / score / update) and its thunk time by kind — library GEMMs, XLA-emitted dots,
the exponentials and logarithms of the softmaxes, copies and transposes, everything else — beside the
iteration's GEMM floor (scripts/bench_real.py's).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_workloads as workloads  # noqa: E402  (imports JAX only inside its functions)


def best_of(run, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def thunk_breakdown(run, trace_dir: str) -> dict[str, float]:
    """Seconds per thunk kind in one traced run (summed over threads, so it can exceed the wall time)."""
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    kinds: collections.Counter = collections.Counter()
    for _, name, seconds in thunks(trace_dir):
        kinds[thunk_kind(name)] += seconds
    return dict(kinds)


def thunks(trace_dir: str):
    """(HLO module, thunk name, seconds) of every XLA:CPU thunk in the newest trace under trace_dir (Python
    frames and executor bookkeeping left out)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    for e in events:
        name, args = e.get("name", ""), e.get("args") or {}
        if e.get("ph") == "X" and "dur" in e and args.get("hlo_op") == name:
            yield args.get("hlo_module", "?"), name, e["dur"] / 1e6


def thunk_kind(name: str) -> str:
    """The kind of an XLA:CPU thunk, from its name (its HLO op, numbering dropped)."""
    kind = re.sub(r"\.\d+$", "", name)
    if kind == "ynn_fusion":
        return "library GEMMs"
    if kind == "dot":
        return "XLA-emitted dots"
    if "exponential" in kind or "log" in kind:
        return "exp / log (softmaxes)"
    if "copy" in kind or "transpose" in kind:
        return "copies and transposes"
    return "other fusions and ops"


def profile_grpo(args) -> dict:
    """The pg stage's GRPO iteration on the real model, its 4th iteration traced: seconds per step and thunk
    seconds per (step, kind), summed over threads."""
    import jax

    import bench_real
    import bench_real_workloads as real
    from rlhf_jax.loop import LoopTail
    from rlhf_jax.stages import pg

    work = tempfile.mkdtemp(prefix="rlhf_jax_grpo_profile_")
    trace_dir = args.trace_dir or os.path.join(work, "trace")
    inputs = real.write_inputs(work, real.REAL)
    spec = {"shape": real.REAL["grpo"], "dtype": args.dtype, "model_dir": args.model_dir, "runs": 1}
    c = real.grpo_config({**spec, "inputs": inputs})
    c.num_steps = 4
    write, steps = LoopTail.write, {}

    def traced_write(self, step, metrics):  # the trace spans iteration 4 alone: from step 3's record to step 4's
        record = write(self, step, metrics)
        if step not in steps:  # a step's first record (one with its time/* split)
            steps[step] = {k: float(v) for k, v in metrics.items() if k.startswith("time/") and k.endswith("_s")}
            if step == 3:
                jax.profiler.start_trace(trace_dir)
            if step == 4:
                jax.profiler.stop_trace()
        return record

    LoopTail.write = traced_write
    try:
        pg.train_and_evaluate(c, os.path.join(work, "run"))
    finally:
        LoopTail.write = write
    by_step: collections.Counter = collections.Counter()
    for module, name, seconds in thunks(trace_dir):
        by_step[f"{re.sub(r'^jit_', '', module)}: {thunk_kind(name)}"] += seconds
    dims, lengths = bench_real.model_dims(args.model_dir), bench_real.token_lengths(args.model_dir, inputs)
    counts = bench_real.gemm_counts({"workload": "grpo"}, real.REAL, dims, lengths)
    return {
        "task": "grpo",
        "dtype": args.dtype,
        "steps_s": steps[4],
        "thunk_s": dict(by_step.most_common()),
        "floor_s": {"jax": bench_real.gemm_floor(counts, args.dtype, "jax")},
        "trace_dir": trace_dir,
    }


def gemm_groups(task: str, s: dict) -> list[tuple[list[tuple[int, int, int]], int]]:
    """The weight GEMMs (M, K, N) of one run, as (group, times run): one group a model call."""
    d, ff, v, L = s["d_model"], 4 * s["d_model"], s["vocab"], s["n_layers"]
    weights = [(d, 3 * d), (d, d), (d, ff), (ff, d)] * L + [(d, v)]
    if task == "generate":  # prefill (M = B·P) once, then one row per sample per new token
        return [
            ([(s["batch"] * s["prompt_len"], k, n) for k, n in weights], 1),
            ([(s["batch"], k, n) for k, n in weights], s["new_tokens"]),
        ]
    m = s["batch"] * s["seq_len"]  # forward, input gradient, weight gradient
    return [([g for k, n in weights for g in ((m, k, n), (m, n, k), (k, m, n))], 1)]


def jax_floor(groups, dtype: str) -> float:
    """Each group as one jitted program of its dots (own operands each, so none is merged away)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    progs = []
    for shapes, times in groups:
        operands = [(jnp.ones(g[:2], dt), jnp.ones(g[1:], dt)) for g in shapes]
        fn = jax.jit(lambda ops: [jnp.dot(a, b, preferred_element_type=jnp.float32) for a, b in ops])
        progs.append((fn, operands, times))

    def run():
        jax.block_until_ready([fn(ops) for fn, ops, times in progs for _ in range(times)])

    run()
    return best_of(run)


def torch_floor(groups, dtype: str) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    dt = getattr(torch, dtype)
    progs = [
        ([(torch.ones(g[:2], dtype=dt), torch.ones(g[1:], dtype=dt)) for g in shapes], times)
        for shapes, times in groups
    ]

    def run():
        with torch.no_grad():
            for operands, times in progs:
                for _ in range(times):
                    for a, b in operands:
                        a @ b

    run()
    return best_of(run)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("train", "generate", "grpo"), default="generate")
    ap.add_argument("--model-dir", default="models/smollm2", help="grpo: the HF directory of SmolLM2-135M")
    ap.add_argument("--dtype", choices=workloads.DTYPES, default="bfloat16")
    ap.add_argument("--trace_dir", default="", help="keep the trace here (default: a temporary directory)")
    ap.add_argument("--out", default="", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    if "jax" in sys.modules:
        sys.exit("scripts/bench_profile.py must start JAX itself (it sets XLA_FLAGS first): run it as a script.")
    # XLA:CPU records per-thunk trace events only with this flag, read when JAX starts.
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true"])

    if args.task == "grpo":
        out = profile_grpo(args)
        print(
            f"GRPO iteration on {args.model_dir}, {args.dtype}: "
            + ", ".join(f"{k[5:-2]} {v:.2f} s" for k, v in out["steps_s"].items())
        )
        for key, sec in out["thunk_s"].items():
            if sec >= 0.01:
                print(f"  thunks: {key:<40}{sec:8.2f} s")
        print(f"  GEMM floor of the iteration, jax: {out['floor_s']['jax']:.2f} s; trace: {out['trace_dir']}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        return out
    shape = workloads.FULL[args.task]
    build = workloads.jax_train if args.task == "train" else workloads.jax_generate
    run = build({"shape": shape, "dtype": args.dtype})
    run()
    run()
    wall = best_of(run)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="rlhf_jax_trace_")
    kinds = thunk_breakdown(run, trace_dir)
    groups = gemm_groups(args.task, shape)
    flops = sum(times * 2 * m * k * n for shapes, times in groups for m, k, n in shapes)
    floors = {"jax": jax_floor(groups, args.dtype), "torch": torch_floor(groups, args.dtype)}
    out = {
        "task": args.task,
        "dtype": args.dtype,
        "shape": shape,
        "run_s": wall,
        "thunk_s": kinds,
        "gemm_flops": flops,
        "floor_s": floors,
        "trace_dir": trace_dir,
    }

    print(f"{args.task} {args.dtype}, shape {shape}")
    print(f"  one run (best of 3):           {wall:8.3f} s")
    for kind, sec in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  thunks: {kind:<29}{sec:8.3f} s  ({sec / sum(kinds.values()):.0%} of thunk time)")
    for name, sec in floors.items():
        if sec is not None:
            print(
                f"  matmul floor, {name:<6} GEMMs only:  {sec:8.3f} s  ({flops / sec / 1e9:.0f} GFLOP/s;"
                f" the run spends {1 - sec / wall:.0%} of its time outside them)"
            )
    print(f"  trace: {trace_dir}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
