"""rlhf_jax side by side with PyTorch + Hugging Face transformers, on this machine.

    python scripts/bench.py [--quick] [--out bench.json] [--runs 5] [--only all|lm|grpo|real]

Measures, for the same model shape, batch, sequence length and dtype policy:
  train_step  one LM step (forward + backward + AdamW with clipping): tokens/s and
              MFU, in float32 and in the bf16-compute / f32-accumulate policy
              (torch: `torch.autocast("cpu", dtype=torch.bfloat16)`);
  generate    sampling with a KV cache, every sample exactly `new_tokens` long: tokens/s;
  ppo         iterations of PPO on the pg stage itself (its `time/*` metrics): episodes/s and
              the share of the iteration spent generating (no PyTorch counterpart);
  grpo        one GRPO iteration of the policy-gradient stage (configs/grpo.py) against TRL's
              GRPOTrainer (scripts/bench_trl.py) on the same model shape, G, prompts, prompt and
              response lengths, reward function and tokenizer, one update per batch, β = 0.04
              with a reference model: episodes/s, TRL in float32 and with bf16 autocast;
  peak        the best FLOP/s of one large square matmul, per dtype, in both systems;
  real        (--only real, not part of all) SmolLM2-135M-Instruct side by side with TRL and transformers,
              the same weights: GRPO, DPO, generation, forward + backward (scripts/bench_real.py says how,
              and its flags: --dtype, --gen-batches, --workloads, --model-dir).

Each system runs in its own worker process (so peak RSS, `ru_maxrss`, is its own)
that builds and warms up once (compile / warm-up time reported apart), then the
two are asked for one timed run each, alternating which goes first, and the
median of the runs is reported (the best run too, as a check on interference).
A full run takes about 5 minutes on an idle 2-core machine; other work on the
machine slows PyTorch's OpenMP threads far more than JAX, so only numbers from
an idle machine compare the two (the load average is printed and saved).
--quick is a smoke test (seconds): its numbers mean nothing.
Needs `pip install -r requirements-parity.txt`.

This file is the driver (what is measured, in which order) and the report; the worker processes and their
protocol are scripts/bench_harness.py, our workloads and the shapes scripts/bench_workloads.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata

import bench_real
from bench_harness import Worker, machine_info, peak_rss_mib, progress, protocol_stream, serve, side_by_side, start_pair
from bench_workloads import (
    DTYPES,
    FULL,
    GRPO_WARMUP,
    QUICK,
    grpo_inputs,
    jax_generate,
    jax_grpo,
    jax_model,
    jax_peak,
    jax_ppo,
    jax_train,
)


def measure_grpo(shape: dict, logdir: str) -> dict:
    """Ours, then TRL in float32, then TRL with bf16 autocast: each alone, in its own process."""
    inputs = grpo_inputs(logdir, shape)
    out = {"rlhf_jax": Worker("bench.py", "grpo", logdir, {"shape": shape, "inputs": inputs}).reply()}
    for dt in DTYPES:
        out[f"trl_{dt}"] = Worker(
            "bench_trl.py", "grpo", logdir, {"shape": shape, "inputs": inputs, "dtype": dt}
        ).reply()
    return out


def summarize_grpo(r: dict, s: dict) -> dict:
    """Episodes/s from the median iteration after GRPO_WARMUP, for each system, and our ratio to TRL's best."""
    ours = [i["time/generate_s"] + i["time/score_s"] + i["time/update_s"] for i in r["rlhf_jax"]["iterations"]]
    out = {
        "shape": s,
        "rlhf_jax": {
            "episodes_per_s": s["batch"] / statistics.median(ours[GRPO_WARMUP:]),
            "iteration_s": ours,
            "peak_rss_mib": r["rlhf_jax"]["peak_rss_mib"],
        },
    }
    for dt in DTYPES:
        steps = r[f"trl_{dt}"]["step_s"]
        out[f"trl_{dt}"] = {
            "episodes_per_s": s["batch"] / statistics.median(steps[GRPO_WARMUP:]),
            "iteration_s": steps,
            "peak_rss_mib": r[f"trl_{dt}"]["peak_rss_mib"],
            "trl": r[f"trl_{dt}"]["trl"],
        }
    best = max(out[f"trl_{dt}"]["episodes_per_s"] for dt in DTYPES)
    out["ratio_vs_trl"] = out["rlhf_jax"]["episodes_per_s"] / best
    return out


def measure_all(shapes: dict, runs: int, quick: bool, logdir: str) -> dict:
    """Peak FLOP/s, then train and generate in both dtypes, then the PPO stage.

    A full run gives every workload its own pair of workers (so each peak RSS belongs to one
    workload) and runs the PPO stage alone. --quick only checks that everything runs: one pair
    serves all workloads, the PPO stage runs beside them (its compiles use the other core), and
    XLA compiles without LLVM optimisation (half the compile time of these tiny, fast programs).
    """
    results, t0 = {}, time.perf_counter()
    progress("starting workers, measuring peak FLOP/s", t0)
    flags = "--xla_backend_optimization_level=0" if quick else ""
    ppo = Worker("bench.py", "ppo", logdir, {"shape": shapes["ppo"]}, flags) if quick else None
    workers = start_pair(logdir, flags)
    try:
        results["peak"] = {k: w.ask("peak") for k, w in workers.items()}
        for task in ("train", "generate"):
            for dt in DTYPES:
                progress(f"{task} {dt}", t0)
                if not quick and results.keys() != {"peak"}:
                    for w in workers.values():
                        w.close()
                    workers = start_pair(logdir)
                spec = {"shape": shapes[task], "dtype": dt}
                results[f"{task}_{dt}"] = side_by_side(workers, task, spec, runs, pause_s=0.0 if quick else 0.2)
        progress("ppo stage", t0)
        ppo = ppo or Worker("bench.py", "ppo", logdir, {"shape": shapes["ppo"]})
        results["ppo"] = ppo.reply()
    finally:
        for w in [*workers.values(), *([ppo] if ppo else [])]:
            w.close()
    progress("done", t0)
    return results


SYSTEMS = ("rlhf_jax", "torch")


def _rates(r: dict, units_per_run: int, flops_per_unit: float = 0.0, peak: float = 0.0, own_peak: float = 0.0):
    """Adds units/s (from the median run and from the best run), ratios and, given FLOPs, MFU."""
    for name in SYSTEMS:
        x = r[name]
        x["tokens_per_s"], x["best_tokens_per_s"] = units_per_run / x["median_s"], units_per_run / x["min_s"]
        if flops_per_unit:
            x["mfu"] = x["tokens_per_s"] * flops_per_unit / peak
            x["mfu_vs_own_dtype_peak"] = x["tokens_per_s"] * flops_per_unit / own_peak
    r["ratio_vs_torch"] = r["rlhf_jax"]["tokens_per_s"] / r["torch"]["tokens_per_s"]
    # The fastest run of each is the least disturbed by other work on the machine: a cross-check.
    r["best_run_ratio_vs_torch"] = r["rlhf_jax"]["best_tokens_per_s"] / r["torch"]["best_tokens_per_s"]
    return r


def summarize(results: dict, shapes: dict) -> dict:
    """Adds tokens/s, ratios (ours / theirs) and MFU to the raw timings."""
    from rlhf_jax import perf

    peak = results["peak"]
    bf16_peak = max(peak["rlhf_jax"]["bfloat16"], peak["torch"]["bfloat16"])  # the higher: the harder MFU
    f32_peak = max(peak["rlhf_jax"]["float32"], peak["torch"]["float32"])
    s, g = shapes["train"], shapes["generate"]
    flops_per_token = perf.train_flops_per_token(jax_model(s, "float32", s["seq_len"]).cfg, s["seq_len"])
    train = {"flops_per_token": flops_per_token, "shape": s}
    gen = {"shape": g}
    for dt in DTYPES:
        train[dt] = _rates(
            results[f"train_{dt}"],
            s["batch"] * s["seq_len"],
            flops_per_token,
            bf16_peak,
            bf16_peak if dt == "bfloat16" else f32_peak,
        )
        gen[dt] = _rates(results[f"generate_{dt}"], g["batch"] * g["new_tokens"])
    # Headline: the project's own policy (bf16 compute, f32 params and accumulation).
    train["ratio_vs_torch"] = train["bfloat16"]["ratio_vs_torch"]
    train["mfu"] = train["bfloat16"]["rlhf_jax"]["mfu"]
    gen["ratio_vs_torch"] = gen["bfloat16"]["ratio_vs_torch"]
    its = results["ppo"]["iterations"][1:]  # the first iteration compiles
    med = lambda k: statistics.median(i[k] for i in its)
    ppo = {
        "episodes_per_s": med("perf/episodes_per_sec"),
        "generate_frac": med("time/generate_frac"),
        "generate_s": med("time/generate_s"),
        "score_s": med("time/score_s"),
        "update_s": med("time/update_s"),
        "rollout_tokens_per_s": med("perf/rollout_tokens_per_sec"),
        "timed_iterations": len(its),
        "first_iteration_s": sum(
            results["ppo"]["iterations"][0][k] for k in ("time/generate_s", "time/score_s", "time/update_s")
        ),
        "peak_rss_mib": results["ppo"]["peak_rss_mib"],
        "config": results["ppo"]["config"],
    }
    return {
        "train_step": train,
        "generate": gen,
        "ppo": ppo,
        "peak_flops": {
            "bfloat16": bf16_peak,
            "float32": f32_peak,
            "by_system": peak,
            "method": "best of 5 timed runs of one 2048x2048 @ 2048x2048 matmul in that dtype with "
            "f32 accumulation (jax: jnp.dot(preferred_element_type=f32), jitted; torch: "
            "a @ b, 2 threads); MFU divides by the higher of the two systems' bf16 peak",
        },
    }


def goals(out: dict) -> dict:
    """Issue 35's goals (GRPO >= 2x TRL, DPO >= 1x TRL, generation >= 2.5x transformers, forward + backward
    >= 1x torch, peak RSS at most TRL's), on whichever sections this run measured: the real model's
    (bench_real.real_goals) and, at the small GPT-2 shapes, the same thresholds."""
    found = {}
    if "train_step" in out:
        t, g = out["train_step"], out["generate"]
        for dt in DTYPES:
            found[f"GPT-2 shape train step >= 1x torch tokens/s ({dt})"] = t[dt]["ratio_vs_torch"] >= 1.0
        for dt in DTYPES:
            found[f"GPT-2 shape generate >= 2.5x torch tokens/s ({dt})"] = g[dt]["ratio_vs_torch"] >= 2.5
    if "grpo" in out:
        found["GPT-2 shape grpo >= 2x TRL GRPOTrainer episodes/s (its faster dtype)"] = (
            out["grpo"]["ratio_vs_trl"] >= 2.0
        )
    if "real" in out:
        found.update(bench_real.real_goals(out["real"]))
    return found


def table(out: dict) -> str:
    m = out["machine"]
    v = m["versions"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, bf16 instructions {m['bf16_instructions'] or 'none'}; "
        f"jax {v['jax']}, flax {v['flax']}, torch {v['torch']}"
        + (f" ({m['torch_threads']} threads)" if "torch_threads" in m else "")
        + f", transformers {v['transformers']}, trl {v.get('trl')}",
        f"load average (1 min) before the benchmark {m['loadavg_1m_at_start']:.2f}, after it "
        f"{m['loadavg_1m_at_end']:.2f} (which counts the benchmark's own threads)"
        + ("  <- other work was running: treat the numbers as provisional" if m["loadavg_1m_at_start"] > 0.5 else ""),
    ]
    if "train_step" in out:
        lines += _lm_table(out)
    if "grpo" in out:
        q, s = out["grpo"], out["grpo"]["shape"]
        lines += [
            "",
            f"grpo iteration ({s['batch']} episodes = {s['batch'] // s['group']} prompts x G={s['group']}, "
            f"d_model {s['d_model']} x {s['n_layers']} layers, {s['new_tokens']} new tokens, one update, "
            f"β {s['beta']}; median of {len(q['rlhf_jax']['iteration_s']) - GRPO_WARMUP} iterations):",
        ]
        lines += [
            f"  {name:<22}{q[k]['episodes_per_s']:>8.1f} episodes/s   RSS {q[k]['peak_rss_mib']:.0f} MiB"
            for name, k in (
                ("rlhf_jax (bf16)", "rlhf_jax"),
                ("TRL GRPOTrainer f32", "trl_float32"),
                ("TRL GRPOTrainer bf16", "trl_bfloat16"),
            )
        ]
        lines.append(f"  ratio vs TRL's faster: {q['ratio_vs_trl']:.2f}x")
    if "real" in out:
        lines += bench_real.real_table(out["real"])
    lines += ["", "goals:"]
    if out["quick"]:
        lines[-1] = "goals (NOT meaningful with --quick: tiny shapes, unoptimised XLA, PPO running alongside):"
    lines += [f"  [{'met' if ok else 'MISSED'}] {k}" for k, ok in out["goals"].items()]
    return "\n".join(lines)


def _lm_table(out: dict) -> list[str]:
    p = out["peak_flops"]
    lines = [
        f"peak matmul FLOP/s: bf16 {p['bfloat16'] / 1e9:.0f} G, f32 {p['float32'] / 1e9:.0f} G  "
        f"(jax bf16 {p['by_system']['rlhf_jax']['bfloat16'] / 1e9:.0f} / f32 "
        f"{p['by_system']['rlhf_jax']['float32'] / 1e9:.0f}, torch bf16 "
        f"{p['by_system']['torch']['bfloat16'] / 1e9:.0f} / f32 {p['by_system']['torch']['float32'] / 1e9:.0f})",
        "",
        f"{'benchmark (median)':<28}{'rlhf_jax':>12}{'torch':>12}{'ours/theirs':>13}{'best runs':>11}"
        f"{'warmup ours/theirs (s)':>25}{'RSS MiB ours/theirs':>22}",
    ]
    t, g = out["train_step"], out["generate"]
    rows = [(f"train tok/s {dt}", t[dt]) for dt in DTYPES] + [(f"generate tok/s {dt}", g[dt]) for dt in DTYPES]
    for label, r in rows:
        a, b = r["rlhf_jax"], r["torch"]
        lines.append(
            f"{label:<28}{a['tokens_per_s']:>12.0f}{b['tokens_per_s']:>12.0f}{r['ratio_vs_torch']:>12.2f}x"
            f"{r['best_run_ratio_vs_torch']:>10.2f}x{a['warmup_s'][0]:>14.1f} / {b['warmup_s'][0]:<8.1f}"
            f"{a['peak_rss_mib']:>12.0f} / {b['peak_rss_mib']:<8.0f}"
        )
    for dt in DTYPES:
        a, b = t[dt]["rlhf_jax"], t[dt]["torch"]
        lines.append(
            f"{'train MFU ' + dt:<28}{a['mfu']:>11.1%} {b['mfu']:>11.1%}   (of the bf16 peak; "
            f"of the {dt} peak: {a['mfu_vs_own_dtype_peak']:.1%} / {b['mfu_vs_own_dtype_peak']:.1%})"
        )
    q = out["ppo"]
    lines += [
        "",
        f"ppo iteration ({q['config']['batch_size']} episodes, d_model {q['config']['model']['d_model']}, "
        f"{q['config']['max_new_tokens']} new tokens, {q['config']['epochs']}x"
        f"{q['config']['num_minibatches']} minibatches): {q['episodes_per_s']:.1f} episodes/s, "
        f"generate {q['generate_frac']:.0%} of the iteration (generate {q['generate_s']:.3f}s, score "
        f"{q['score_s']:.3f}s, update {q['update_s']:.3f}s; median of {q['timed_iterations']}), "
        f"RSS {q['peak_rss_mib']:.0f} MiB",
    ]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; args.dtypes is the tuple of dtypes --dtype names."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the whole benchmark")
    ap.add_argument("--out", default="bench.json", help="where to write the JSON results")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per system and workload (median reported)")
    ap.add_argument(
        "--only",
        choices=("all", "lm", "grpo", "real"),
        default="all",
        help="lm: train, generate, PPO and the peak (vs PyTorch); grpo: GRPO vs TRL; all: both; "
        "real: SmolLM2-135M vs TRL and transformers (scripts/bench_real.py)",
    )
    ap.add_argument(
        "--dtype", choices=("both", *DTYPES), default="both", help="real: the float32 and/or the bf16 policy"
    )
    ap.add_argument(
        "--gen-batches", type=int, nargs="+", default=list(bench_real.REAL["generate"]["batches"]), help="real"
    )
    ap.add_argument(
        "--workloads", nargs="+", choices=bench_real.WORKLOADS, default=list(bench_real.WORKLOADS), help="real"
    )
    ap.add_argument("--model-dir", default="models/smollm2", help="real: the HF directory both systems load")
    ap.add_argument("--no-floor", action="store_true", help="real: skip timing the GEMM floors")
    ap.add_argument(
        "--remat",
        choices=("none", "dots", "full"),
        default="none",
        help="real: our GRPO and DPO stages' model.remat (rematerialise each block in the backward pass: less "
        "memory held, a second forward); TRL's side is unchanged",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, json.loads(args.spec))
    for pkg in ("torch", "transformers") + (("trl",) if args.only != "lm" else ()):
        try:
            metadata.version(pkg)
        except metadata.PackageNotFoundError:
            sys.exit(
                f"scripts/bench.py compares with PyTorch and TRL: {pkg} is not installed. "
                f"Run `pip install -r requirements-parity.txt` (a CPU build of torch first)."
            )
    if args.runs < 1:
        sys.exit(f"--runs={args.runs}: need at least 1 timed run (5 or more for a median worth reporting).")
    if args.only == "real" and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(
            f"--model-dir={args.model_dir}: no HF directory there. Write one with "
            f"`python -m rlhf_jax.convert gguf --out={args.model_dir}` (bash scripts/setup_real.sh installs the GGUF)."
        )
    shapes = QUICK if args.quick else FULL
    out = {"quick": args.quick, "runs": args.runs, "machine": machine_info()}
    if args.only == "real":
        out["remat"] = args.remat
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_logs_") as logdir:
        if args.only == "real":
            measured = bench_real.measure_real(args, logdir, t0)
            progress("GEMM floors" if not args.no_floor else "summary", t0)
            out["real"] = bench_real.summarize_real(measured, args, floors=not args.no_floor)
        if args.only in ("all", "lm"):
            results = measure_all(shapes, args.runs, args.quick, logdir)
            out["machine"]["torch_threads"] = results["peak"]["torch"].pop("threads")
            out.update(summarize(results, shapes))
        if args.only in ("all", "grpo"):
            progress("grpo vs trl", t0)
            out["grpo"] = summarize_grpo(measure_grpo(shapes["grpo"], logdir), shapes["grpo"])
    out["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    out["goals"] = goals(out)
    out["wall_s"] = time.perf_counter() - t0
    print(table(out))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out} ({out['wall_s']:.0f}s)")
    return out


def run_worker(role: str, spec: dict):
    if role == "serve":
        import rlhf_jax.stages.lm  # noqa: F401  (import jax, flax, optax before saying hello)

        return serve({"train": jax_train, "generate": jax_generate}, jax_peak)
    if role.startswith("real_"):
        import bench_real_workloads as real
        import rlhf_jax.stages.lm  # noqa: F401

        if role == "real_serve":
            return serve({"generate": real.jax_generate, "fwdbwd": real.jax_fwdbwd}, dict, warmup=1)
        return real.jax_grpo(spec) if role == "real_grpo" else real.jax_dpo(spec)
    proto = protocol_stream()
    result = jax_grpo(spec) if role == "grpo" else jax_ppo(spec)
    result["peak_rss_mib"] = peak_rss_mib()
    proto.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
