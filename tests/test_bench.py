"""Benchmarks: the FLOP count behind MFU, and `scripts/bench.py --quick` end to end (needs torch)."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from rlhf_jax import perf
from rlhf_jax.forward import token_nll
from rlhf_jax.models.gpt import TransformerLM
from rlhf_jax.models.layers import ModelConfig
from tests.conftest import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_len=64, dtype="float32"),
        ModelConfig(
            vocab_size=256,
            d_model=128,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_len=64,
            dtype="float32",
            mlp="swiglu",
            position="rope",
            tie_embeddings=False,
        ),
    ],
    ids=["gpt2", "llama"],
)
def test_train_flops_per_token_matches_xla_count(cfg):
    """6·N + 12·L·T·D counts the matmuls; XLA counts every op of forward + backward, so it is a
    little higher (norms, softmax, GELU), never lower, and not by much at d_model=128."""
    B, T = 2, 64
    tokens = jnp.zeros((B, T + 1), jnp.int32)
    batch = {"tokens": tokens, "input_mask": jnp.ones_like(tokens), "loss_mask": jnp.ones_like(tokens)}
    model = TransformerLM(cfg)
    params = nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), tokens[:, :-1], jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32))[
            "params"
        ]
    )
    params = {k: v for k, v in params.items() if k in ("trunk", "lm_head")}  # heads the LM loss uses
    grad = jax.grad(lambda p: jnp.sum(token_nll(p, model, batch)[0]))
    cost = jax.jit(grad).lower(params).compile().cost_analysis()
    xla_per_token = (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)
    assert 1.0 <= xla_per_token / perf.train_flops_per_token(cfg, T) < 1.08


def test_profile_floor_runs_the_gemms_mfu_counts():
    """scripts/bench_profile.py's matmul floor for a train step is the 6·N part of the MFU FLOP count, and its
    generate floor is one 2·N forward per prompt position and per new token."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))  # bench_profile.py imports bench_workloads.py beside it
    spec = importlib.util.spec_from_file_location("bench_profile", os.path.join(ROOT, "scripts", "bench_profile.py"))
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    s = dict(vocab=256, d_model=64, n_layers=2, n_heads=4, seq_len=32, batch=2, prompt_len=5, new_tokens=7)
    cfg = ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"])
    flops = lambda groups: sum(t * 2 * m * k * n for shapes, t in groups for m, k, n in shapes)
    attention = 12.0 * cfg.n_layers * s["seq_len"] * cfg.d_model
    per_token = perf.train_flops_per_token(cfg, s["seq_len"]) - attention  # 6·N
    assert flops(profile.gemm_groups("train", s)) == per_token * s["batch"] * s["seq_len"]
    positions = s["batch"] * (s["prompt_len"] + s["new_tokens"])
    assert flops(profile.gemm_groups("generate", s)) == per_token / 3 * positions


def test_measured_peak_is_a_plausible_rate():
    peak = perf.measured_peak_flops("float32", n=256, repeats=2)
    assert 1e8 < peak < 1e15  # FLOP/s: above a 1990s CPU, below a pod


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="the PyTorch comparison needs `pip install -r requirements-parity.txt`",
)
@pytest.mark.slow
def test_quick_benchmark_writes_every_result(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], None))  # one CPU device
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--only", "lm", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "ours/theirs" in proc.stdout and "NOT meaningful with --quick" in proc.stdout

    t, g, shape = r["train_step"], r["generate"], r["train_step"]["shape"]
    cfg = ModelConfig(
        vocab_size=shape["vocab"],
        d_model=shape["d_model"],
        n_layers=shape["n_layers"],
        n_heads=shape["n_heads"],
        max_len=shape["seq_len"],
    )
    assert t["flops_per_token"] == perf.train_flops_per_token(cfg, shape["seq_len"])
    for section, dt in [(s, dt) for s in (t, g) for dt in ("bfloat16", "float32")]:
        ours, theirs = section[dt]["rlhf_jax"], section[dt]["torch"]
        for sys_result in (ours, theirs):
            assert len(sys_result["seconds"]) == r["runs"] >= 5
            assert sys_result["median_s"] == statistics.median(sys_result["seconds"]) > 0
            assert len(sys_result["warmup_s"]) >= 1 and sys_result["peak_rss_mib"] > 50
        assert section[dt]["ratio_vs_torch"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert t["ratio_vs_torch"] == t["bfloat16"]["ratio_vs_torch"]
    assert g["ratio_vs_torch"] == g["bfloat16"]["ratio_vs_torch"]
    ours = t["bfloat16"]["rlhf_jax"]
    assert ours["tokens_per_s"] == pytest.approx(shape["batch"] * shape["seq_len"] / ours["median_s"])
    assert t["mfu"] == pytest.approx(ours["tokens_per_s"] * t["flops_per_token"] / r["peak_flops"]["bfloat16"])
    assert 0 < t["mfu"] < 1

    assert r["peak_flops"]["bfloat16"] >= r["peak_flops"]["by_system"]["rlhf_jax"]["bfloat16"] > 0
    assert r["peak_flops"]["method"]
    assert r["ppo"]["episodes_per_s"] > 0 and 0 < r["ppo"]["generate_frac"] < 1
    assert r["ppo"]["timed_iterations"] >= 1
    assert set(r["goals"].values()) <= {True, False} and len(r["goals"]) == 5
    assert r["machine"]["cores"] >= 1 and r["machine"]["versions"]["jax"] == jax.__version__


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="the GRPO comparison needs TRL: `pip install -r requirements-parity.txt`",
)
@pytest.mark.slow
def test_quick_grpo_benchmark_runs_both_systems_on_the_same_inputs(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], None))  # one CPU device
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--only", "grpo", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = json.loads(out.read_text())["grpo"]
    iterations = g["shape"]["iterations"]
    for k in ("rlhf_jax", "trl_float32", "trl_bfloat16"):
        assert len(g[k]["iteration_s"]) == iterations and g[k]["episodes_per_s"] > 0, k
        assert g[k]["episodes_per_s"] == pytest.approx(g["shape"]["batch"] / statistics.median(g[k]["iteration_s"][2:]))
    best = max(g["trl_float32"]["episodes_per_s"], g["trl_bfloat16"]["episodes_per_s"])
    assert g["ratio_vs_trl"] == pytest.approx(g["rlhf_jax"]["episodes_per_s"] / best)
    assert "ratio vs TRL's faster" in proc.stdout
