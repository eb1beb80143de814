"""RLVR on a real model: GRPO (or another policy-gradient algorithm) from SmolLM2-135M-Instruct itself (no SFT),
rewarded by the built-in task's gold judge (a verifiable reward), evaluated on held-out prompts before training
and every 10 iterations, per instruction kind. The setting most GRPO users run.

    bash scripts/setup_real.sh && source .venv/bin/activate
    python -m rlhf_jax.convert gguf --out=models/smollm2
    python scripts/smollm2_rlvr.py --seeds 0 1 2                     # GRPO in runs/smollm2_rlvr; then --collect
    python scripts/smollm2_rlvr.py --seeds 0 1 2 --algorithm gspo    # in runs/smollm2_rlvr_gspo

--algorithm takes any policy-gradient algorithm of the configs (rlhf_jax.algorithms: gspo, cispo, dapo, ...) or
a variant of experiments/algorithms_tuning.py (grpo+tis): its ALGORITHMS entry's pg and kl settings (the loss,
its clip ranges and aggregation, minibatches, the KL term, DAPO's dynamic sampling and overlong shaping, whose
cache is a fifth of the 32-token budget as in the tiny presets) over the rlvr preset; the sizes (4 prompts x
G 4 per iteration), lr and schedule stay the rlvr run's, so each algorithm gets the same budget as GRPO.

Per seed: configs/smollm2.py:rlvr (LoRA r8, 16 episodes per iteration = 4 prompts × G 4, 32 new tokens,
β 0.04 with k3 in the loss, one update per batch) at lr 1e-4, 40 iterations over 1,000 training prompts of the
8 short kinds, with the task's system message "Answer with the result only."; the run is extended 10
iterations at a time (the same command resumes; the lr schedule spans all 40) and its policy decodes the same
200 held-out prompts with the same keys (temperature 0.7) at 0, 10, ..., 40. Each evaluation and the run's
summary are written as they finish (<root>/seed=<s>/evals.json), so an interrupted seed resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

KINDS = ("copy", "reverse", "sort", "add", "subtract", "count", "first", "last")  # the pipeline's
ITERATIONS, EVERY, EVAL_PROMPTS, TRAIN_PROMPTS = 40, 10, 200, 1000
LR, MAX_NEW_TOKENS, TEMPERATURE = 1e-4, 32, 0.7


def algorithm_overrides(name: str) -> dict:
    """The rlvr preset's changes for an algorithm or variant: its ALGORITHMS pg and kl settings, the variant's
    pg keys on top ({} for GRPO, the preset's own)."""
    from experiments.algorithms_tuning import VARIANTS
    from rlhf_jax import algorithms

    keys = VARIANTS.get(name, {"policy": name})
    known = algorithms.algorithms()
    if keys["policy"] not in algorithms.of_stage("pg"):
        variants = sorted(v for v, k in VARIANTS.items() if known[k["policy"]].stage == "pg")
        sys.exit(
            f"--algorithm {name}: not a policy-gradient algorithm; use one of {sorted(algorithms.of_stage('pg'))}"
            f" or a variant {variants}."
        )
    if name == "grpo":
        return {}
    settings = known[keys["policy"]].settings
    out = {"pg": dict(settings.get("pg", {})), "kl": dict(settings.get("kl", {}))}
    if out["pg"].get("overlong_cache"):
        out["pg"]["overlong_cache"] = MAX_NEW_TOKENS // 5
    for dotted, value in keys.items():  # e.g. pg.pg.rollout_correction: the pipeline's pg block, then the key
        if dotted != "policy":
            _, block, key = dotted.split(".", 2)
            out.setdefault(block, {})[key] = value
    return out


def stage_config(seed: int, prompts: str, num_steps: int, base: str, algorithm: str = "grpo"):
    from configs import smollm2
    from rlhf_jax.config import merge_config
    from rlhf_jax.tasks.instructions import SYSTEM_PROMPT

    c = smollm2.get_config("rlvr")
    merge_config(c, algorithm_overrides(algorithm), f"--algorithm {algorithm}")
    c.seed = seed
    c.init_from = base
    c.num_steps = num_steps
    c.optim.total_steps = ITERATIONS  # one schedule over the whole run, however it is cut
    c.optim.lr = LR
    c.data.prompts_path = prompts
    c.data.chat_system = SYSTEM_PROMPT
    c.rollout.max_new_tokens = MAX_NEW_TOKENS
    c.checkpoint.every = EVERY
    c.progress = False
    return c


def evaluate(policy: str, prompts_path: str, data_dir: str, seed: int) -> dict:
    """Gold score, exact-correct and answer-correct on the held-out prompts, overall and per kind."""
    import numpy as np

    from rlhf_jax import parallel
    from rlhf_jax.data import chat, prompts as prompt_data
    from rlhf_jax.tasks import builtin
    from rlhf_jax.tasks.instructions import SYSTEM_PROMPT, kind_of, parse_instruction
    from rlhf_jax.trained import generate, load_policy, sampling_settings

    mesh, rules = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}), parallel.DEFAULT_RULES
    model, params, tok = load_policy(policy, mesh, rules)
    template = chat.get_template("chatml", system=SYSTEM_PROMPT)
    source, _ = prompt_data.build_prompt_dataset(prompts_path, "prompt", tok.path, 48, data_dir, template=template)
    settings = sampling_settings(tok, MAX_NEW_TOKENS, TEMPERATURE, template)
    out = generate(model, params, tok, source, settings, mesh, rules, seed=seed + 100, batch_size=50)
    prompts, responses = out["prompts"], out["responses"]
    kinds = [kind_of(parse_instruction(p)) for p in prompts]
    result = {"all": builtin.evaluate_responses(prompts, responses), "samples": list(zip(prompts, responses))[:8]}
    for k in KINDS:
        idx = [i for i, x in enumerate(kinds) if x == k]
        if idx:
            result[k] = {
                **builtin.evaluate_responses([prompts[i] for i in idx], [responses[i] for i in idx]),
                "n": len(idx),
            }
    result["response_tokens"] = float(np.mean(out["response_mask"].sum(1)))
    return result


def run_seed(root: str, seed: int, base: str, algorithm: str = "grpo") -> dict:
    from rlhf_jax.stages import run_stage
    from rlhf_jax.tasks import builtin

    home = os.path.join(root, f"seed={seed}")
    os.makedirs(home, exist_ok=True)
    train = builtin.write_prompts(os.path.join(home, "train_prompts.jsonl"), TRAIN_PROMPTS, seed + 5, kinds=KINDS)
    held = builtin.write_prompts(
        os.path.join(home, "eval_prompts.jsonl"), EVAL_PROMPTS, seed + 6, split="eval", kinds=KINDS
    )
    log = os.path.join(home, "evals.json")
    evals = json.load(open(log)) if os.path.isfile(log) else {}
    workdir = os.path.join(home, "grpo")
    for it in range(0, ITERATIONS + 1, EVERY):
        if str(it) in evals:
            continue
        t0 = time.perf_counter()
        if it:
            run_stage(stage_config(seed, train, it, base, algorithm), workdir)
        t1 = time.perf_counter()
        evals[str(it)] = {
            **evaluate(workdir if it else base, held, os.path.join(home, "eval_data"), seed),
            "train_s": t1 - t0,
            "eval_s": time.perf_counter() - t1,
        }
        with open(log + ".tmp", "w") as f:
            json.dump(evals, f, indent=1)
        os.replace(log + ".tmp", log)
        e = evals[str(it)]["all"]
        print(
            f"{algorithm} seed {seed} iteration {it}: gold {e['gold_score']:.3f} exact {e['correct_rate']:.3f}",
            flush=True,
        )
    return evals


def collect(root: str, algorithm: str = "grpo") -> str:
    """<root>/rlvr.md and rlvr.json: exact-correct per kind at 0 and 40 iterations, and over the iterations,
    mean over seeds (each seed's values listed)."""
    import numpy as np

    from rlhf_jax import algorithms

    seeds = sorted(
        int(d.split("=")[1])
        for d in os.listdir(root)
        if d.startswith("seed=") and os.path.isfile(os.path.join(root, d, "evals.json"))
    )
    runs = {s: json.load(open(os.path.join(root, f"seed={s}", "evals.json"))) for s in seeds}
    done = [s for s in seeds if str(ITERATIONS) in runs[s]]
    lines = [
        f"## RLVR: {algorithms.label(algorithm)} from SmolLM2-135M-Instruct against the gold judge "
        f"({len(done)} seeds finished: {done})",
        "",
        "Held-out exact-correct over the iterations (mean over the finished seeds; each seed in brackets):",
        "",
        "| iteration | gold score | exact-correct | answer-correct | response tokens | train + eval s |",
        "|---|---|---|---|---|---|",
    ]
    for it in range(0, ITERATIONS + 1, EVERY):
        rows = [runs[s][str(it)] for s in done]
        if not rows:
            continue

        def cell(key, rows=rows):
            values = [r["all"][key] for r in rows]
            return f"{np.mean(values):.3f} [" + ", ".join(f"{v:.3f}" for v in values) + "]"

        lines.append(
            f"| {it} | {cell('gold_score')} | {cell('correct_rate')} | {cell('answer_correct_rate')} | "
            f"{np.mean([r['response_tokens'] for r in rows]):.1f} | "
            f"{np.mean([r['train_s'] + r['eval_s'] for r in rows]):.0f} |"
        )
    lines += ["", f"Per instruction kind, before → after {ITERATIONS} iterations (mean over seeds):", ""]
    lines += ["| kind | n per seed | exact-correct | gold score |", "|---|---|---|---|"]
    for k in KINDS:
        if done and all(k in runs[s]["0"] for s in done):
            mean = lambda it, key, k=k: np.mean([runs[s][str(it)][k][key] for s in done])
            n = "/".join(str(runs[s]["0"][k]["n"]) for s in done)
            lines.append(
                f"| {k} | {n} | {mean(0, 'correct_rate'):.3f} → {mean(ITERATIONS, 'correct_rate'):.3f} | "
                f"{mean(0, 'gold_score'):.3f} → {mean(ITERATIONS, 'gold_score'):.3f} |"
            )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "rlvr.md"), "w") as f:
        f.write(text)
    with open(os.path.join(root, "rlvr.json"), "w") as f:
        json.dump({str(s): runs[s] for s in seeds}, f, indent=1)
    return text


def seed_evals(root: str) -> dict[int, dict]:
    """{seed: its evals.json} for the seeds of root that reached the last iteration (root/seed=<s>/evals.json)."""
    out = {}
    for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, d, "evals.json")
        if d.startswith("seed=") and os.path.isfile(path):
            evals = json.load(open(path))
            if str(ITERATIONS) in evals:
                out[int(d.split("=")[1])] = evals
    return out


def compare(roots: dict[str, str], reference: str = "grpo") -> str:
    """A markdown table of the algorithms' held-out results after ITERATIONS iterations, each root holding one
    algorithm's seeds: mean over its finished seeds, and its gold minus the reference's on the same seed
    (mean [95% t-interval] once there are 2 seeds or more)."""
    import numpy as np

    from experiments.smollm2 import interval
    from rlhf_jax import algorithms

    runs = {name: seed_evals(root) for name, root in roots.items()}
    base = runs.get(reference, {})
    last = str(ITERATIONS)
    lines = [
        f"RLVR from SmolLM2-135M-Instruct, held-out after {ITERATIONS} iterations (mean over seeds, each in brackets):",
        "",
        f"| algorithm | seeds | gold | gold − {algorithms.label(reference)}, same seed | exact-correct | "
        "answer-correct | response tokens | train + eval min a seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, evals in runs.items():
        if not evals:
            continue
        seeds = sorted(evals)
        gold = [evals[s][last]["all"]["gold_score"] for s in seeds]
        paired = [g - base[s][last]["all"]["gold_score"] for s, g in zip(seeds, gold) if s in base]
        if name == reference or not paired:
            delta = "—"
        else:
            i = interval(paired)
            delta = (
                f"{i['mean']:+.3f}"
                + (f" [{i['lo']:+.3f}, {i['hi']:+.3f}]" if i["n"] > 1 else "")
                + (" (" + ", ".join(f"{d:+.3f}" for d in paired) + ")")
            )
        mean = lambda key, evals=evals, seeds=seeds: np.mean([evals[s][last]["all"][key] for s in seeds])
        minutes = np.mean([sum(e["train_s"] + e["eval_s"] for e in evals[s].values()) / 60 for s in seeds])
        lines.append(
            f"| {algorithms.label(name)} | {', '.join(map(str, seeds))} | {np.mean(gold):.3f} ["
            + ", ".join(f"{g:.3f}" for g in gold)
            + f"] | {delta} | {mean('correct_rate'):.3f} | {mean('answer_correct_rate'):.3f} | "
            f"{np.mean([evals[s][last]['response_tokens'] for s in seeds]):.1f} | {minutes:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    global ITERATIONS, EVERY, EVAL_PROMPTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algorithm", default="grpo", help="gspo, cispo, dapo, grpo+tis, ... (module docstring)")
    ap.add_argument("--root", default=None, help="default runs/smollm2_rlvr (GRPO), runs/smollm2_rlvr_<algorithm>")
    ap.add_argument("--base", default="models/smollm2", help="SmolLM2-Instruct's HF directory (rlhf_jax.convert)")
    ap.add_argument("--collect", action="store_true", help="only write <root>/rlvr.md from the finished seeds")
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="ALGORITHM=ROOT",
        help="only print the table of the algorithms in these roots, e.g. grpo=runs/smollm2_rlvr gspo=...",
    )
    ap.add_argument("--iterations", type=int, default=ITERATIONS, help="a smaller run, e.g. to try the script")
    ap.add_argument("--every", type=int, default=EVERY)
    ap.add_argument("--eval-prompts", type=int, default=EVAL_PROMPTS)
    a = ap.parse_args()
    ITERATIONS, EVERY, EVAL_PROMPTS = a.iterations, a.every, a.eval_prompts
    if a.compare:
        print(compare(dict(pair.split("=", 1) for pair in a.compare)))
        return
    root = a.root or "runs/smollm2_rlvr" + ("" if a.algorithm == "grpo" else "_" + a.algorithm.replace("+", "_"))
    algorithm_overrides(a.algorithm)  # an unknown name stops here, before any run
    if not a.collect:
        for s in a.seeds:
            run_seed(root, s, a.base, a.algorithm)
    print(collect(root, a.algorithm))


if __name__ == "__main__":
    main()
