"""README's pod-memory table: PPO for three model shapes on three topologies, planned by rlhf_jax.plan.

    python scripts/plan_table.py [--out runs/plan_table] [--only gpt2,llama7b]

Each entry runs `python -m rlhf_jax.plan` in its own process (the fake device count is set before JAX
starts) for configs/hh_rlhf.py:gpt2_ppo with the shape, the mesh (every chip in fsdp) and the HBM of one
topology, and the same PPO settings everywhere: 64 episodes per iteration in 4 minibatches of 16,
256-token prompts and 128-token responses, the critic a separate model initialised from the RM
(four models in memory), full rematerialisation, bf16 compute with f32 params and Adam moments.
Writes <out>/<entry>.json and <out>/table.md. The figures are XLA:CPU compilations: estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "gpt2": ("GPT-2 124M", dict(vocab_size=50304)),  # the preset's own GPT-2 shape, its vocabulary padded to 128
    "pythia1b": (
        "Pythia 1B",
        dict(
            vocab_size=50304,
            d_model=2048,
            n_layers=16,
            n_heads=8,
            max_len=2048,
            position="rope",
            rotary_pct=0.25,
            mlp="gelu_exact",
            parallel_residual=True,
            tie_embeddings=False,
        ),
    ),
    "llama7b": (
        "LLaMA 7B",
        dict(
            vocab_size=32000,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            d_ff=11008,
            max_len=2048,
            position="rope",
            norm="rmsnorm",
            norm_eps=1e-6,
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
        ),
    ),
}
TOPOLOGIES = {"v4-8": (4, 32.0), "v5e-16": (16, 16.0), "8xH100": (8, 80.0)}  # (chips, HBM GiB per chip)
PPO = {
    "batch_size": 64,
    "pg.num_minibatches": 4,
    "data.max_prompt_len": 256,
    "rollout.max_new_tokens": 128,
    "pg.critic": "reward_model",
    "model.remat": "full",
    "reward.rm_workdir": "unused",
}
VARIANTS = {
    "full": {},
    "lora": {"model.lora.rank": 16, "model.lora.alpha": 16.0, "model.lora.targets": ("query", "key", "value", "out")},
}


def entries(only: set[str] | None):
    for shape, (_, model) in SHAPES.items():
        if only and shape not in only:
            continue
        for topo, (chips, hbm) in TOPOLOGIES.items():
            for variant, extra in VARIANTS.items():
                if variant == "lora" and shape == "gpt2":
                    continue  # 124M fits everywhere without it
                yield (
                    f"{shape}_{topo}_{variant}",
                    shape,
                    topo,
                    chips,
                    hbm,
                    variant,
                    {**PPO, **{f"model.{k}": v for k, v in model.items()}, **extra, "mesh.data": 1, "mesh.fsdp": chips},
                )


def flag(k, v):
    return f"--config.{k}={repr(tuple(v)) if isinstance(v, tuple) else v}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "plan_table"))
    p.add_argument("--only", default="", help="comma-separated shapes (gpt2, pythia1b, llama7b)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for name, shape, topo, chips, hbm, variant, overrides in entries(set(a.only.split(",")) - {""} or None):
        path = os.path.join(a.out, f"{name}.json")
        if not os.path.isfile(path):
            cmd = [
                sys.executable,
                "-m",
                "rlhf_jax.plan",
                "--config=configs/hh_rlhf.py:gpt2_ppo",
                f"--devices={chips}",
                f"--hbm_gib={hbm}",
                f"--json={path}",
                *(flag(k, v) for k, v in overrides.items()),
            ]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
                return 1
            print(f"{name}: planned in {time.perf_counter() - t0:.0f}s", flush=True)
        with open(path) as f:
            rows.append((shape, topo, chips, hbm, variant, json.load(f)))
    g = lambda b: f"{b / 2**30:.1f}"
    lines = [
        "| model | topology | mesh | variant | params + optimizer state (trained) | frozen ref + RM | "
        "peak (function) | HBM | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, topo, chips, hbm, variant, r in rows:
        fn = r["peak_function"]
        lines.append(
            f"| {SHAPES[shape][0]} | {topo} | fsdp {chips} | {'LoRA r=16' if variant == 'lora' else 'full'} | "
            f"{g(r['params_bytes'] + r['opt_state_bytes'])} GiB | {g(r['frozen_bytes'])} GiB | "
            f"{g(r['total_bytes'])} GiB ({fn}) | {hbm:g} GiB | {'yes' if r['fits'] else 'no'} |"
        )
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
