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
    # thunks by kind, from XLA:CPU's names
    names = ["ynn_fusion.12", "dot.3", "subtract_exponential_fusion.2", "log_add_fusion", "copy_bitcast_fusion.1"]
    kinds = ["library GEMMs", "XLA-emitted dots", "exp / log (softmaxes)", "exp / log (softmaxes)"]
    assert [profile.thunk_kind(n) for n in names] == kinds + ["copies and transposes"]
    assert profile.thunk_kind("add_select_fusion.4") == "other fusions and ops"


def test_measured_peak_is_a_plausible_rate():
    peak = perf.measured_peak_flops("float32", n=256, repeats=2)
    assert 1e8 < peak < 1e15  # FLOP/s: above a 1990s CPU, below a pod


_HEAP_PROBE = """
import ctypes, json
import jax, jax.numpy as jnp
from rlhf_jax import perf

def rss_mib():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
perf.compilations()
# 192 MiB of small blocks on the heap, all freed but the last, so their pages are not the heap's top (glibc's
# free returns only the top to the OS): what a compiler's freed working memory looks like.
blocks = [libc.malloc(1024) for _ in range(192 * 1024 + 1)]
for b in blocks:
    ctypes.memset(b, 1, 1024)
for b in blocks[:-1]:
    libc.free(b)
held = rss_mib()
before = perf.compilations()
jax.jit(lambda x: jnp.tanh(x) * 3.0)(jnp.ones(7)).block_until_ready()
print(json.dumps({"held": held, "after": rss_mib(), "compiled": perf.compilations() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc: Linux only")
def test_a_compilation_hands_the_freed_heap_back_to_the_os():
    """After each XLA compilation perf's listener returns the heap's free pages to the OS: 192 MiB freed
    below the heap's top stays resident until a compile, and is gone after it."""
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, cwd=ROOT, check=True, timeout=120
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["compiled"] >= 1
    assert r["held"] - r["after"] > 150, r


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
    assert set(r["goals"].values()) <= {True, False} and len(r["goals"]) == 4
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


# ----------------------------------------------------------------------------- the real model (--only real)


def _scripts():
    """scripts/bench.py and scripts/bench_real.py as modules (they import their neighbours by name)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench
    import bench_real

    return bench, bench_real


def test_real_cli_chooses_dtypes_batches_and_workloads():
    bench, real = _scripts()
    smoke = bench.parse_args(["--only", "real", "--runs", "1", "--dtype", "float32", "--gen-batches", "16"])
    assert [real.result_key(i) for i in real.plan(smoke)] == [
        "grpo_float32",
        "dpo_float32",
        "generate16_float32",
        "fwdbwd_float32",
    ]
    full = bench.parse_args(["--only", "real"])
    keys = [real.result_key(i) for i in real.plan(full)]
    assert full.runs == 5 and len(keys) == 10 and len(set(keys)) == 10
    assert {"generate16_bfloat16", "generate64_bfloat16", "grpo_bfloat16", "fwdbwd_float32"} <= set(keys)
    only = bench.parse_args(["--only", "real", "--workloads", "dpo", "--dtype", "bfloat16"])
    assert [real.result_key(i) for i in real.plan(only)] == ["dpo_bfloat16"]


def _fake_result(ours_s: float, theirs_s: float, theirs: str, rss: tuple[float, float], steps=False) -> dict:
    side = lambda s, r, extra: {
        "seconds": [s, s * 1.1, s * 0.9],
        "median_s": s,
        "min_s": s * 0.9,
        "warmup_s": [10 * s],
        "peak_rss_mib": r,
        **({"steps": [extra] * 3} if steps else {}),
    }
    split = {"time/generate_s": 1.0, "time/score_s": 0.5, "time/update_s": 0.5, "perf/prompt_width": 32}
    split.update({"perf/response_width": 32, "objective/response_length": 20.0, "perf/compilations": 7})
    return {"rlhf_jax": side(ours_s, rss[0], split), theirs: side(theirs_s, rss[1], {"completions/mean_length": 18})}


SMOLLM2_DIMS = dict(d=576, q=576, kv=192, ff=1536, vocab=49152, layers=30)


def test_real_rates_goals_and_table_from_timings():
    """Units/s from the median run, ours / theirs, the issue's goals (met or missed) and one table row each."""
    bench, real = _scripts()
    args = bench.parse_args(["--only", "real", "--dtype", "float32", "--gen-batches", "16"])
    results = {
        "grpo_float32": _fake_result(8.0, 24.0, "trl", (3000, 4000), steps=True),  # 3x, less memory: met
        "dpo_float32": _fake_result(4.0, 2.0, "trl", (5000, 4000), steps=True),  # 0.5x, more memory: missed
        "generate16_float32": _fake_result(4.0, 8.0, "torch", (1, 1)),  # 2x < 2.5x: missed
        "fwdbwd_float32": _fake_result(1.0, 1.0, "torch", (1, 1)),  # 1x: met
    }
    lengths = {"grpo_prompt": 27, "dpo_sequence": 43}
    rows = real.summarize_rows(results, args, SMOLLM2_DIMS, lengths, floors=False)
    s = real.REAL
    assert rows["grpo_float32"]["ours"]["per_s"] == pytest.approx(s["grpo"]["prompts"] * s["grpo"]["group"] / 8.0)
    assert rows["grpo_float32"]["ratio"] == pytest.approx(3.0)
    assert rows["generate16_float32"]["ours"]["per_s"] == pytest.approx(16 * s["generate"]["new_tokens"] / 4.0)
    assert rows["dpo_float32"]["best_run_ratio"] == pytest.approx(0.5)
    assert rows["grpo_float32"]["split"]["time/generate_s"] == 1.0
    goals = real.real_goals({"rows": rows})
    assert goals == {
        "SmolLM2 grpo >= 2x TRL GRPOTrainer episodes/s (float32)": True,
        "SmolLM2 grpo peak RSS <= TRL GRPOTrainer's (float32)": True,
        "SmolLM2 dpo >= 1x TRL DPOTrainer pairs/s (float32)": False,
        "SmolLM2 dpo peak RSS <= TRL DPOTrainer's (float32)": False,
        "SmolLM2 generate batch 16 >= 2.5x transformers tokens/s (float32)": False,
        "SmolLM2 fwdbwd >= 1x torch tokens/s (float32)": True,
    }
    out = {"rows": rows, "dims": SMOLLM2_DIMS, "lengths": lengths, "dpo_seq_len": 96}
    text = "\n".join(real.real_table(out))
    for label in ("grpo float32 episodes/s", "dpo float32 pairs/s", "generate16 float32", "fwdbwd float32"):
        assert label in text
    assert "3.00x" in text and "generate 1.00s, score 0.50s, update 0.50s" in text
    assert set(bench.goals({"real": {"rows": rows}})) == set(goals)  # the printed block is the goals


def test_real_gemm_floor_counts_every_weight_matmul():
    """The floor's FLOPs: 2·N per token forward and 6·N forward + backward, N = the weight matrices' size."""
    _, real = _scripts()
    d = SMOLLM2_DIMS
    n = d["layers"] * (2 * d["d"] * d["q"] + 2 * d["d"] * d["kv"] + 3 * d["d"] * d["ff"]) + d["d"] * d["vocab"]
    assert 134e6 < n < 136e6  # SmolLM2-135M, tied embedding counted once (as the LM head)
    flops = lambda item, lengths={}: sum(
        2 * m * k * c * nn for (m, k, nn), c in real.gemm_counts(item, real.REAL, d, lengths).items()
    )
    g, f = real.REAL["generate"], real.REAL["fwdbwd"]
    assert flops({"workload": "generate", "batch": 16}) == 2 * n * 16 * (g["prompt_len"] + g["new_tokens"])
    assert flops({"workload": "fwdbwd"}) == 6 * n * f["batch"] * f["seq_len"]
    r, P = real.REAL["grpo"], 27
    E, N = r["prompts"] * r["group"], r["new_tokens"]
    grpo = flops({"workload": "grpo"}, {"grpo_prompt": P})
    trunk, head = 2 * (n - d["d"] * d["vocab"]), 2 * d["d"] * d["vocab"]  # FLOPs per token
    # generate, reference, update: the trunk at every position, the head only where a response token is predicted
    assert grpo == trunk * E * (P + N) * 5 + head * E * (1 + N) + head * E * N + 3 * head * E * N


def test_real_inputs_give_both_systems_the_same_prompts_and_pairs(tmp_path):
    _, real = _scripts()
    from rlhf_jax.tasks.instructions import SYSTEM_PROMPT

    inputs = real.write_inputs(str(tmp_path), real.REAL)
    chats = real.grpo_messages(inputs["prompts"])  # what TRL's dataset holds
    with open(inputs["prompts"]) as f:
        records = [json.loads(line)["messages"] for line in f]  # what ours reads, chat_system in front
    assert len(chats) == len(records) == real.REAL["grpo"]["prompts"]
    assert [c[1:] for c in chats] == records and all(r[-1]["role"] == "user" for r in records)
    assert all(c[0] == {"role": "system", "content": SYSTEM_PROMPT} for c in chats)
    pairs = real.read_pairs(inputs["pairs"])
    assert len(pairs) == real.REAL["dpo"]["pairs"] and all(p["chosen"] != p["rejected"] for p in pairs)
    a = {"workload": "grpo", "dtype": "float32"}
    spec = real.specs(a, real.REAL, "/m", inputs, 3, 96)
    assert spec["inputs"] == inputs and spec["shape"] == real.REAL["grpo"] and spec["runs"] == 3


@pytest.mark.slow
def test_real_prompts_render_to_the_same_tokens_in_both_systems(tmp_path, tmp_path_factory):
    """Ours (config.data.chat_system + the checkpoint's template, as the rlvr preset) and transformers'
    apply_chat_template (TRL's) give the same ids for every GRPO prompt, and for every DPO pair up to the
    newline HF's template writes after the last <|im_end|>. (Slow: it converts the GGUF's tokenizer.)"""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from configs import smollm2
    from rlhf_jax.data import chat
    from rlhf_jax.data.tokenizer import load_tokenizer, tokenizer_file_in
    from tests.helpers import smollm2_hf_dir

    _scripts()
    import bench_real_workloads as real

    hf_dir = smollm2_hf_dir(tmp_path_factory, layers=1)
    inputs = real.write_inputs(str(tmp_path), real.REAL)
    ours_tok, theirs = load_tokenizer(tokenizer_file_in(hf_dir)), AutoTokenizer.from_pretrained(hf_dir)
    ids = lambda m, gen: theirs.apply_chat_template(m, add_generation_prompt=gen, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    c = smollm2.get_config("rlvr")
    c.data.chat_system = real.system_message()
    template = chat.config_template(c.data)
    with open(inputs["prompts"]) as f:
        records = [json.loads(line)["messages"] for line in f]
    for record, full in zip(records, real.grpo_messages(inputs["prompts"]), strict=True):
        assert chat.render_prompt(record, ours_tok, template=template) == ids(full, True)
    template = chat.config_template(smollm2.get_config("dpo").data)
    for p in real.read_pairs(inputs["pairs"]):
        dialogue = p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]
        theirs_ids = ids(dialogue, False)
        assert theirs_ids[-1] == theirs.convert_tokens_to_ids("Ċ")  # "\n", byte-level
        assert chat.render_dialogue(dialogue, ours_tok, template=template)[0] == theirs_ids[:-1]


def test_stepped_workers_alternate_and_report_each_step():
    """bench_harness.Stepper / alternate_steps, the protocol GRPO and DPO run under: warm-up steps apart, then
    the timed steps alternate, each reply carrying its loop's own extras, and "quit" ends a paused loop."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_harness

    loop = (
        "import sys, time; sys.path.insert(0, {!r})\n"
        "from bench_harness import Stepper, StopBench\n"
        "s = Stepper(); s.start()\n"
        "try:\n"
        "    for i in range(100):\n"
        "        time.sleep(0.01)\n"
        "        s.pause({{'step': i}})\n"
        "except StopBench:\n"
        "    print('stopped', file=sys.stderr)\n"
    ).format(os.path.join(ROOT, "scripts"))
    workers = {}
    for name in ("rlhf_jax", "trl"):
        w = bench_harness.Worker.__new__(bench_harness.Worker)
        w.name, w.log = name, os.devnull
        w.proc = subprocess.Popen(
            [sys.executable, "-c", loop], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        workers[name] = w
    try:
        r = bench_harness.alternate_steps(workers, runs=3, warmup=2, pause_s=0.0)
    finally:
        for w in workers.values():
            w.close()
    for name in workers:
        assert [s["step"] for s in r[name]["steps"]] == [2, 3, 4]
        assert len(r[name]["warmup_s"]) == 2 and all(0.005 < s < 5 for s in r[name]["seconds"])
        assert r[name]["median_s"] == statistics.median(r[name]["seconds"]) and r[name]["peak_rss_mib"] > 1
        assert workers[name].proc.returncode == 0
