"""Will a stage fit? Its jitted step compiled ahead of time from shapes alone, on N fake CPU devices.

    python -m rlhf_jax.plan --config=configs/hh_rlhf.py:gpt2_ppo --devices=8 --config.mesh.fsdp=8 \\
        --hbm_gib=16 --config.model.vocab_size=50304

Takes the config and overrides rlhf_jax.main takes; `--config.model.*` describes a model shape with no
checkpoint (or `--config.init_from` reads one's config.json, never its weights). Nothing is allocated:
the train state is `train_state.abstract_state` (ShapeDtypeStructs carrying their shardings), the batch
likewise, and each stage's own jitted functions (`lm.jit_train_step`, `rm.jit_train_step`,
`pg.jit_functions`) are lowered and compiled. Per device it reports the params, the optimizer state
and what `compiled.memory_analysis()` says of each compiled function: arguments, outputs, temporaries
(activations, gradients, KV cache) and the outputs written into donated inputs (alias).

PPO holds four models at once: the policy and the critic (a separate model with pg.critic=reward_model,
else a value head on the policy) with their optimizer state, the frozen reference policy (none with LoRA,
model.lora.rank > 0: the policy with its adapters off; optimizer state then only for the adapters) and the RM
(reward.kind=rm; assumed the policy's architecture, one RM, not an ensemble). Its iteration runs three
compiled functions one after another: the rollout (sampling with the KV cache), the scoring (policy,
critic, reference and RM forwards) and the update (E × M minibatch steps). A function's peak is its own
arguments + outputs + temporaries − aliased bytes, plus every resident model it does not take as an
argument; the stage's peak is the largest. Not counted: the advantage function (elementwise over the
[B, N] rollout), host memory, the runtime's own overhead and fragmentation. The figures are XLA:CPU's
compilation of the program; a TPU or GPU compiler fuses and lays out differently, so treat them as
estimates and keep headroom.
"""

from __future__ import annotations

import os
import sys

from rlhf_jax.xla_flags import with_device_count


def use_fake_cpu_devices(argv: list[str]) -> None:
    """Sets the fake CPU device count to argv's --devices=N (default 8), keeping every other XLA flag.
    Must run before JAX initialises its backends, hence before this module imports it."""
    n = "8"
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            n = arg.split("=", 1)[1]
        elif arg == "--devices" and i + 1 < len(argv):
            n = argv[i + 1]
    os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), n)
    os.environ["JAX_PLATFORMS"] = "cpu"  # on an accelerator host too: the devices planned for are fake


if __name__ == "__main__":
    use_fake_cpu_devices(sys.argv)

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from rlhf_jax import config as config_lib, lora, optim, parallel, pg_setup, rl, train_state  # noqa: E402
from rlhf_jax.errors import ConfigError  # noqa: E402
from rlhf_jax.models.gpt import TransformerLM  # noqa: E402
from rlhf_jax.models.layers import LoraConfig  # noqa: E402

GIB = 2**30


class ShapeOnlyTokenizer:
    """Token ids a rollout needs (stop, pad) with no tokenizer file: ids change no shape."""

    pad_id, bos_id, eos_id = 0, 1, 2
    role_ids = {"system": 3, "user": 4, "assistant": 5, "end": 6}


def plan(config: ml_collections.ConfigDict, hbm_gib: float = 0.0) -> dict:
    """Per-device bytes of config.stage on the devices JAX sees (the config's mesh over all of them).

    Returns {"stage", "mesh", "devices", "params_bytes" (trained: policy + critic for PPO), "opt_state_bytes",
    "frozen_bytes" (PPO's reference policy + RM), "functions": {name: {"argument", "output", "temp", "alias",
    "peak" (with the resident models it does not take)}}, "peak_function", "total_bytes", "hbm_gib", "fits"}.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    if c.init_from:
        from rlhf_jax.run import adopt_model_config

        adopt_model_config(c)
    config_lib.validate(c)
    if c.model.vocab_size <= 0:
        raise ConfigError(
            "config.model.vocab_size is -1 (from the tokenizer), and the planner reads no tokenizer: "
            "set it, e.g. --config.model.vocab_size=50304, or --config.init_from a checkpoint."
        )
    mesh = parallel.make_mesh({a: c.mesh[a] for a in parallel.MESH_AXES})
    rules = parallel.rules_from_config(c.mesh.rules)
    parallel.check_batch(c.batch_size, mesh, rules)
    parallel.check_batch(
        c.batch_size // c.grad_accum, mesh, rules, "config.batch_size / config.grad_accum (the microbatch)"
    )
    model = TransformerLM(config_lib.model_config(c))
    build = {"pretrain": _lm, "sft": _lm, "rm": _rm, "pg": _pg}.get(c.stage)
    if build is None:
        raise ConfigError(f"config.stage={c.stage!r}: the planner covers pretrain, sft, rm and pg.")
    state, frozen, functions = build(c, model, mesh, rules)

    # What stays on the devices for the whole run, in parts a compiled function may take as arguments.
    held = {"state rest": state.rest(), **frozen}  # rest: optimizer state, step, RNG, extras
    held.update({f"params/{k}": v for k, v in state.params.items()} if c.stage == "pg" else {"params": state.params})
    resident = {k: parallel.per_device_bytes(v) for k, v in held.items()}
    report = {
        "stage": c.stage,
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "params_bytes": parallel.per_device_bytes(state.params),
        "opt_state_bytes": parallel.per_device_bytes(state.opt_state),
        "frozen_bytes": sum(resident[k] for k in frozen),
        "functions": {},
    }
    for name, (compiled, takes) in functions.items():
        m = compiled.memory_analysis()
        f = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
        f["peak"] = (
            f["argument"] + f["output"] + f["temp"] - f["alias"] + sum(b for k, b in resident.items() if k not in takes)
        )
        report["functions"][name] = f
    report["peak_function"] = max(report["functions"], key=lambda k: report["functions"][k]["peak"])
    report["total_bytes"] = report["functions"][report["peak_function"]]["peak"]
    report["hbm_gib"] = hbm_gib
    report["fits"] = report["total_bytes"] <= hbm_gib * GIB if hbm_gib > 0 else None
    return report


def _batch(shape, mesh, rules, dtype=jnp.int32, lead: int = 0):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, rules, len(shape), lead))


def _compile(jitted, mesh, rules, *args):
    with parallel.activate(mesh, rules):
        return jitted.lower(*args).compile()


def _lm(c, model, mesh, rules):
    """Pretrain / SFT: batch records tokens, input_mask, loss_mask int32 [B, L+1] (stages/lm.py)."""
    from rlhf_jax.stages import lm

    tx, schedule = optim.make_optimizer(c.optim, c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps)
    tx = lora.optimizer(tx, model.cfg)  # as the stage builds it: with LoRA, the adapters' state only
    state, shardings = train_state.abstract_state(
        train_state.model_init_fn(model, c.data.seq_len, c.seed), tx, mesh, rules, c.seed
    )
    batch = {k: _batch((c.batch_size, c.data.seq_len + 1), mesh, rules) for k in ("tokens", "input_mask", "loss_mask")}
    step = lm.jit_train_step(model, tx, schedule, c, shardings, mesh, rules)
    return state, {}, {"train step": (_compile(step, mesh, rules, state, batch), ("params", "state rest"))}


def _rm(c, model, mesh, rules):
    """RM: tokens, input_mask int32 [B, K, L], valid [B, K] (stages/rm.py); K = data.num_responses (0: a pair),
    an ensemble's with a leading member axis."""
    from rlhf_jax.stages import rm

    E = c.rm.ensemble_size if c.rm.ensemble_size > 1 else 0
    tx, schedule = optim.make_optimizer(c.optim, c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps)
    tx = lora.optimizer(tx, model.cfg)  # as the stage builds it: with LoRA, the adapters' state only
    init = (
        train_state.ensemble_init_fn(model, c.data.seq_len, c.seed, E)
        if E
        else train_state.model_init_fn(model, c.data.seq_len, c.seed)
    )
    state, shardings = train_state.abstract_state(init, tx, mesh, rules, c.seed, members=E)
    K, lead = c.data.num_responses or 2, (E,) if E else ()
    batch = {
        "tokens": _batch((*lead, c.batch_size, K, c.data.seq_len), mesh, rules, lead=len(lead)),
        "input_mask": _batch((*lead, c.batch_size, K, c.data.seq_len), mesh, rules, lead=len(lead)),
        "valid": _batch((*lead, c.batch_size, K), mesh, rules, lead=len(lead)),
    }
    step = rm.jit_train_step(model, tx, schedule, c, shardings, mesh, rules)
    return state, {}, {"train step": (_compile(step, mesh, rules, state, batch), ("params", "state rest"))}


def _pg(c, model, mesh, rules):
    """PPO and its family: the generation, scoring and update of one iteration (stages/pg.py), with the
    rollout passed between them shaped by `jax.eval_shape` of the functions that fill it in."""
    from rlhf_jax import rewards
    from rlhf_jax.stages import pg

    group = pg_setup.check_config(c)
    updates = c.pg.epochs * c.pg.num_minibatches
    iterations = c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps
    tx, _ = optim.make_optimizer(c.optim, iterations * updates)
    tx = lora.optimizer(tx, model.cfg)
    state, shardings = train_state.abstract_state(
        pg_setup.init_params_fn(model, c), tx, mesh, rules, c.seed, extras=rl.kl_controller_init(c.kl.init_coef)
    )
    # The stage's copy of the initial policy (same shapes); with LoRA none: the reference is the policy with its
    # adapters off (rlhf_jax/lora.py), and only the adapters and value head hold optimizer state.
    frozen = {} if c.model.lora.rank else {"reference": state.params["policy"]}
    B, P = c.batch_size, c.data.max_prompt_len
    if c.reward.kind == "rm":
        rm_model = TransformerLM(dataclasses.replace(model.cfg, dropout=0.0, lora=LoraConfig()))
        reward, from_host = rewards.RewardModel(rm_model, None, {"gain": 1.0, "bias": 0.0, "ensemble_size": 1}), None
        frozen["rm"] = parallel.abstract_params(train_state.model_init_fn(rm_model, 8, 0), mesh, rules)
    else:  # each Python function's scores [B, F] arrive from the host
        fns = rewards.import_functions(c.reward.function, "reward.function") if c.reward.function else {"fn": None}
        reward = rewards.RewardFunction(fns, None, mesh, rules, weights=tuple(c.reward.weights))
        from_host = _batch((B, len(fns)), mesh, rules, jnp.float32)
    steps = pg.jit_functions(model, tx, c, ShapeOnlyTokenizer(), reward, group, shardings, mesh, rules)
    prompt, prompt_mask, keys = (
        _batch((B, P), mesh, rules),
        _batch((B, P), mesh, rules),
        _batch((B, 2), mesh, rules, jnp.uint32),
    )
    shard = lambda tree: jax.tree.map(lambda x: _batch(x.shape, mesh, rules, x.dtype) if x.ndim else x, tree)
    with parallel.activate(mesh, rules):
        generated = shard(jax.eval_shape(steps.generate, state.params["policy"], prompt, prompt_mask, keys))
        scored = shard(
            jax.eval_shape(steps.score, state.params, frozen.get("reference"), frozen.get("rm"), generated, from_host)
        )
        rollout = shard(jax.eval_shape(steps.advantages, scored, state.extras["kl_coef"]))
    ptx = None
    if c.pg.ptx_coef > 0:
        ptx = {
            k: _batch((updates * c.pg.ptx_batch_size, c.data.ptx_seq_len + 1), mesh, rules)
            for k in ("tokens", "input_mask", "loss_mask")
        }
    trained = tuple(f"params/{k}" for k in state.params)
    functions = {
        "rollout": (
            _compile(steps.generate, mesh, rules, state.params["policy"], prompt, prompt_mask, keys),
            ("params/policy",),
        ),
        "score": (
            _compile(
                steps.score, mesh, rules, state.params, frozen.get("reference"), frozen.get("rm"), generated, from_host
            ),
            (*trained, "reference", "rm"),
        ),
        "update": (_compile(steps.update, mesh, rules, state, rollout, ptx), (*trained, "state rest")),
    }
    return state, frozen, functions


def format_report(r: dict) -> str:
    """The report as lines of GiB per device."""
    g = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"
    lines = [
        f"{r['stage']} on {r['devices']} devices, mesh {r['mesh']} (per device, compiled on CPU from shapes):",
        f"  params {g(r['params_bytes'])}, optimizer state {g(r['opt_state_bytes'])}"
        + (f", frozen reference + RM {g(r['frozen_bytes'])}" if r["frozen_bytes"] else ""),
    ]
    for name, f in r["functions"].items():
        lines.append(
            f"  {name}: arguments {g(f['argument'])}, outputs {g(f['output'])}, temporaries {g(f['temp'])}, "
            f"donated {g(f['alias'])}; peak with the resident rest {g(f['peak'])}"
        )
    verdict = (
        ""
        if r["fits"] is None
        else (f": fits in {r['hbm_gib']:g} GiB" if r["fits"] else f": does NOT fit in {r['hbm_gib']:g} GiB")
    )
    lines.append(f"  total {g(r['total_bytes'])} (at the {r['peak_function']}){verdict}")
    return "\n".join(lines)


def main(argv):
    import json

    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if jax.device_count() != _DEVICES.value:
        raise SystemExit(
            f"error: JAX sees {jax.device_count()} devices, not --devices={_DEVICES.value}: run the "
            f"planner as `python -m rlhf_jax.plan`, so it sets the fake device count before JAX starts."
        )
    report = plan(_CONFIG.value, _HBM_GIB.value)
    print(format_report(report))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from rlhf_jax import cli

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Stage config file, e.g. configs/hh_rlhf.py:gpt2_ppo.", lock_config=True
    )
    _DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for (the mesh covers them all).")
    _HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory per device in GiB; 0: no fits verdict.")
    _JSON = flags.DEFINE_string("json", "", "Also write the report here as JSON (bytes per device).")
    flags.mark_flags_as_required(["config"])
    config_lib.check_renamed_flags(sys.argv)  # an old key fails naming its new name, before absl's "no such key"
    cli.run(main)
