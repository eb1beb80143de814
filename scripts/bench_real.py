"""scripts/bench.py --only real: SmolLM2-135M-Instruct side by side with TRL and transformers, the same weights.

    python scripts/bench.py --only real [--runs 5] [--dtype both|float32|bfloat16] [--gen-batches 16 64]
        [--workloads grpo dpo generate fwdbwd] [--model-dir models/smollm2]

Workloads (sizes in bench_real_workloads.REAL), each in float32 and in the bf16 policy:
  grpo      one GRPO iteration (8 prompts x G = 4, 32-token responses, β = 0.04 with a reference, one update,
            the gold judge): configs/smollm2.py:rlvr as it runs by default vs TRL's GRPOTrainer; episodes/s and
            our generate / score / update split;
  dpo       one DPO step on 8 pairs of the built-in task, the reference's log-probs computed in the step on both
            sides (precomputed on neither): configs/smollm2.py:dpo vs TRL's DPOTrainer; pairs/s;
  generate  KV-cache sampling, 64 new tokens at batch 16 and 64 vs transformers' generate; tokens/s;
  fwdbwd    forward + backward of the token loss at [8, 128] vs torch; tokens/s.
Each system runs in its own worker (peak RSS its own): generate and fwdbwd build, warm up once and then time
runs alternately (scripts/bench_harness.side_by_side); GRPO and DPO run each system's own training loop,
paused after every step so the two alternate step by step (bench_harness.Stepper), the first STEP_WARMUP
steps (compilation, allocator warm-up) left out of the median. Beside each workload, its GEMM floor: the
seconds its weight matmuls alone take at its own shapes (prompts and pairs at the length of the longest, as
TRL pads; responses at full length), timed one distinct GEMM at a time in each system, like
scripts/bench_profile.py's floor. A full run (5 runs, both dtypes, batch 16 and 64) takes about 45 minutes
on an idle 2-core machine (an estimate: most of it is the two GRPO loops and compiling ours, about 2 minutes
per stage and dtype); `--runs 1 --dtype float32 --gen-batches 16` is a smoke test, about 15 minutes idle
and 40 with other work on the machine (at load 5-9 one TRL GRPO step took 6 minutes). Only numbers from an
idle machine compare the two: other work slows torch's OpenMP threads far more than XLA's.
"""

from __future__ import annotations

import os
import statistics
import time

from bench_harness import Worker, alternate_steps, progress, side_by_side
from bench_real_workloads import REAL, STEP_WARMUP, grpo_messages, read_pairs, write_inputs

WORKLOADS = ("grpo", "dpo", "generate", "fwdbwd")
THEIRS = {"grpo": "TRL GRPOTrainer", "dpo": "TRL DPOTrainer", "generate": "transformers", "fwdbwd": "torch"}
UNITS = {"grpo": "episodes/s", "dpo": "pairs/s", "generate": "tokens/s", "fwdbwd": "tokens/s"}
GOALS = {"grpo": 2.0, "dpo": 1.0, "generate": 2.5, "fwdbwd": 1.0}  # ours / theirs, issue 35


def plan(args) -> list[dict]:
    """The measurements a run makes, in order: {"workload", "dtype", "batch" (generate)}."""
    out = []
    for dt in args.dtypes:
        for w in args.workloads:
            out += [{"workload": w, "dtype": dt, "batch": b} for b in args.gen_batches] if w == "generate" else []
            out += [{"workload": w, "dtype": dt}] if w != "generate" else []
    return out


def specs(
    item: dict, shapes: dict, model_dir: str, inputs: dict, runs: int, dpo_seq_len: int, remat: str = "none"
) -> dict:
    """The one spec both systems' workers get for a measurement: same shape, model, inputs, dtype (and our
    stages' model.remat, which TRL's side ignores)."""
    w = item["workload"]
    spec = {"shape": shapes[w], "dtype": item["dtype"], "model_dir": model_dir, "runs": runs, "remat": remat}
    if w == "generate":
        spec["batch"] = item["batch"]
    if w in ("grpo", "dpo"):
        spec["inputs"] = inputs
    if w == "dpo":
        spec["seq_len"] = dpo_seq_len
    return spec


def measure_real(args, logdir: str, t0: float) -> dict:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import smollm2

    model_dir = os.path.abspath(args.model_dir)
    inputs = write_inputs(os.path.join(logdir, "inputs"), REAL)
    dpo_seq_len = smollm2.get_config("dpo").data.seq_len
    results = {}
    for item in plan(args):
        key = result_key(item)
        progress(f"real {key}", t0)
        spec = specs(item, REAL, model_dir, inputs, args.runs, dpo_seq_len, args.remat)
        w = item["workload"]
        if w in ("grpo", "dpo"):
            workers = {
                "rlhf_jax": Worker("bench.py", f"real_{w}", logdir, spec),
                "trl": Worker("bench_real_torch.py", w, logdir, spec),
            }
            try:
                results[key] = alternate_steps(workers, args.runs, STEP_WARMUP)
            finally:
                for x in workers.values():
                    x.close()
        else:
            workers = {
                "rlhf_jax": Worker("bench.py", "real_serve", logdir),
                "torch": Worker("bench_real_torch.py", "serve", logdir),
            }
            try:
                for x in workers.values():
                    x.reply()  # "hello"
                results[key] = side_by_side(workers, w, spec, args.runs)
            finally:
                for x in workers.values():
                    x.close()
        results[key]["spec"] = spec
    return {"results": results, "inputs": inputs, "model_dir": model_dir, "dpo_seq_len": dpo_seq_len}


def result_key(item: dict) -> str:
    return f"{item['workload']}{item.get('batch', '')}_{item['dtype']}"


def units_per_run(item: dict, shapes: dict, dpo_seq_len: int = 0) -> int:
    s = shapes[item["workload"]]
    return {
        "grpo": lambda: s["prompts"] * s["group"],
        "dpo": lambda: s["pairs"],
        "generate": lambda: item.get("batch", 0) * s["new_tokens"],
        "fwdbwd": lambda: s["batch"] * s["seq_len"],
    }[item["workload"]]()


# ----------------------------------------------------------------------------- GEMM floor


def model_dims(model_dir: str) -> dict:
    import json

    with open(os.path.join(model_dir, "config.json")) as f:
        h = json.load(f)
    hd = h["hidden_size"] // h["num_attention_heads"]
    return dict(
        d=h["hidden_size"],
        q=h["num_attention_heads"] * hd,
        kv=h["num_key_value_heads"] * hd,
        ff=h["intermediate_size"],
        vocab=h["vocab_size"],
        layers=h["num_hidden_layers"],
    )


def token_lengths(model_dir: str, inputs: dict) -> dict:
    """Longest GRPO prompt and longest DPO sequence (prompt + response), in the model's tokens as its chat
    template renders them: what TRL pads a batch to."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = lambda m, gen: len(
        tok.apply_chat_template(m, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
    )
    prompt = max(ids(m, True) for m in grpo_messages(inputs["prompts"]))
    pair = max(
        ids(p["prompt"] + [{"role": "assistant", "content": p[k]}], False)
        for p in read_pairs(inputs["pairs"])
        for k in ("chosen", "rejected")
    )
    return {"grpo_prompt": prompt, "dpo_sequence": pair}


def gemm_counts(item: dict, shapes: dict, dims: dict, lengths: dict) -> dict[tuple[int, int, int], int]:
    """{(M, K, N): times run} of one run's weight GEMMs (attention's own products and everything else left
    out). A forward is every weight at M rows; a backward adds the input- and weight-gradient GEMMs."""
    d = dims
    weights = [(d["d"], d["q"]), (d["d"], d["kv"]), (d["d"], d["kv"]), (d["q"], d["d"])]
    weights += [(d["d"], d["ff"]), (d["d"], d["ff"]), (d["ff"], d["d"])]
    trunk, head = [(kn, d["layers"]) for kn in weights], [((d["d"], d["vocab"]), 1)]
    counts: dict = {}

    def add(m: int, times: int, backward: bool, head_rows: int | None = None):
        """The trunk's weights at m rows and the LM head at head_rows (default m), `times` times."""
        for layers, rows in ((trunk, m), (head, m if head_rows is None else head_rows)):
            for (k, n), c in layers:
                for g in ((rows, k, n), (rows, n, k), (k, rows, n)) if backward else ((rows, k, n),):
                    counts[g] = counts.get(g, 0) + c * times

    s, w = shapes[item["workload"]], item["workload"]
    if w == "generate":  # prefill once, then one row per sample per new token
        add(item["batch"] * s["prompt_len"], 1, False)
        add(item["batch"], s["new_tokens"], False)
    elif w == "fwdbwd":
        add(s["batch"] * s["seq_len"], 1, True)
    elif w == "grpo":  # generate; the reference's forward (π_old = π_θ: no old-policy pass); the update. Past
        # the prefill's last token, log-probs are needed at the response's positions only: the head runs there
        E, P, N = s["prompts"] * s["group"], lengths["grpo_prompt"], s["new_tokens"]
        add(E * P, 1, False, head_rows=E)
        add(E, N, False)
        add(E * (P + N), 1, False, head_rows=E * N)
        add(E * (P + N), 1, True, head_rows=E * N)
    else:  # dpo: the reference's forward and the policy's forward + backward over both responses of each pair
        m = 2 * s["pairs"] * lengths["dpo_sequence"]
        add(m, 1, False)
        add(m, 1, True)
    return counts


def gemm_floor(counts: dict, dtype: str, system: str, repeats: int = 3) -> float:
    """Σ times x (best of `repeats` of that one GEMM alone), seconds: each distinct shape timed once (a model's
    30 identical blocks would only repeat it). jax: jnp.dot with f32 accumulation, jitted; torch: a @ b."""
    best = {}
    if system == "jax":
        import jax
        import jax.numpy as jnp

        dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        make = lambda shape: jnp.ones(shape, dtype)
        call = lambda a, b: jax.block_until_ready(dot(a, b))
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        make = lambda shape: torch.ones(shape, dtype=getattr(torch, dtype))
        call = lambda a, b: a @ b
    for m, k, n in counts:
        a, b = make((m, k)), make((k, n))
        call(a, b)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call(a, b)
            times.append(time.perf_counter() - t)
        best[(m, k, n)] = min(times)
    return sum(c * best[g] for g, c in counts.items())


# ----------------------------------------------------------------------------- summary and report


def summarize_real(measured: dict, args, floors: bool = True) -> dict:
    """Units/s (median and best run), ours / theirs, peak RSS each, the GEMM floor; GRPO's split."""
    dims = model_dims(measured["model_dir"])
    lengths = token_lengths(measured["model_dir"], measured["inputs"])
    out = {"sizes": REAL, "dims": dims, "lengths": lengths, "dpo_seq_len": measured["dpo_seq_len"]}
    out["rows"] = summarize_rows(measured["results"], args, dims, lengths, floors)
    return out


def summarize_rows(results: dict, args, dims: dict, lengths: dict, floors: bool = True) -> dict:
    out = {}
    for item in plan(args):
        key = result_key(item)
        r = results[key]
        theirs = "trl" if item["workload"] in ("grpo", "dpo") else "torch"
        row = rates(r, units_per_run(item, REAL), theirs)
        row.update(item)
        if item["workload"] == "grpo":
            row["split"] = grpo_split(r["rlhf_jax"]["steps"])
            row["trl_mean_length"] = _median([x.get("completions/mean_length") for x in r["trl"]["steps"]])
        counts = gemm_counts(item, REAL, dims, lengths)
        row["gemm_flops"] = sum(2 * m * k * n * c for (m, k, n), c in counts.items())
        if floors:
            row["floor_s"] = {sys_: gemm_floor(counts, item["dtype"], sys_) for sys_ in ("jax", "torch")}
        out[key] = row
    return out


def rates(r: dict, units: int, theirs: str) -> dict:
    a, b = r["rlhf_jax"], r[theirs]
    row = {"ours": _rate(a, units), "theirs": _rate(b, units), "theirs_key": theirs}
    row["ratio"] = row["ours"]["per_s"] / row["theirs"]["per_s"]
    row["best_run_ratio"] = row["ours"]["best_per_s"] / row["theirs"]["best_per_s"]
    row["loadavg_1m"] = r.get("loadavg_1m")
    return row


def _rate(x: dict, units: int) -> dict:
    return {
        "per_s": units / x["median_s"],
        "best_per_s": units / x["min_s"],
        "median_s": x["median_s"],
        "seconds": x["seconds"],
        "warmup_s": x["warmup_s"],
        "peak_rss_mib": x["peak_rss_mib"],
    }


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def grpo_split(steps: list[dict]) -> dict:
    """Medians over the timed steps of our stage's own clock (time/*) and the shapes it ran."""
    keys = ("time/generate_s", "time/score_s", "time/update_s", "perf/prompt_width", "perf/response_width")
    out = {k: _median([s.get(k) for s in steps]) for k in keys + ("objective/response_length",)}
    out["compilations"] = [s.get("perf/compilations") for s in steps]
    return out


def real_goals(real: dict) -> dict[str, bool]:
    """The issue's goals, one line per workload and dtype measured."""
    found = {}
    for row in real["rows"].values():
        w, dt = row["workload"], row["dtype"]
        name = f"{w}{' batch ' + str(row['batch']) if w == 'generate' else ''}"
        found[f"SmolLM2 {name} >= {GOALS[w]:g}x {THEIRS[w]} {UNITS[w]} ({dt})"] = row["ratio"] >= GOALS[w]
        if w in ("grpo", "dpo"):
            found[f"SmolLM2 {w} peak RSS <= {THEIRS[w]}'s ({dt})"] = (
                row["ours"]["peak_rss_mib"] <= row["theirs"]["peak_rss_mib"]
            )
    return found


def real_table(real: dict) -> list[str]:
    d, n = real["dims"], real["lengths"]
    lines = [
        "",
        f"SmolLM2-135M-Instruct (d {d['d']}, {d['layers']} layers, vocab {d['vocab']}), the same weights on both "
        f"sides; longest GRPO prompt {n['grpo_prompt']} tokens, longest DPO pair sequence {n['dpo_sequence']} "
        f"(our DPO preset cuts each batch to the smallest width of data.length_bucket's half-octave grid "
        f"holding it, at most "
        f"{real['dpo_seq_len']})",
        f"{'workload (median)':<30}{'rlhf_jax':>11}{'theirs':>11}{'ours/theirs':>13}{'best runs':>11}"
        f"{'RSS MiB ours/theirs':>22}{'GEMM floor s jax/torch':>25}{'ours s':>9}",
    ]
    for row in real["rows"].values():
        w = row["workload"]
        label = f"{w}{row.get('batch', '') if w == 'generate' else ''} {row['dtype']} {UNITS[w]}"
        a, b = row["ours"], row["theirs"]
        floor = row.get("floor_s")
        lines.append(
            f"{label:<30}{a['per_s']:>11.2f}{b['per_s']:>11.2f}{row['ratio']:>12.2f}x{row['best_run_ratio']:>10.2f}x"
            f"{a['peak_rss_mib']:>12.0f} / {b['peak_rss_mib']:<8.0f}"
            + (f"{floor['jax']:>13.3f} / {floor['torch']:<9.3f}" if floor else f"{'-':>25}")
            + f"{a['median_s']:>9.2f}"
        )
        if w == "grpo":
            sp = row["split"]
            lines.append(
                f"  ours: generate {sp['time/generate_s']:.2f}s, score {sp['time/score_s']:.2f}s, update "
                f"{sp['time/update_s']:.2f}s; prompt width {sp['perf/prompt_width']}, response width "
                f"{sp['perf/response_width']}, response tokens {sp['objective/response_length']} (TRL's "
                f"{row['trl_mean_length']}); compilations by step {sp['compilations']}"
            )
    lines.append(
        f"  theirs: {', '.join(f'{k} = {v}' for k, v in THEIRS.items())}; GEMM floor: the weight matmuls alone at "
        f"the run's shapes (a bound no implementation beats; ours s / floor = distance to it)"
    )
    return lines
