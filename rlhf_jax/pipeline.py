"""The main job: the whole InstructGPT recipe on the built-in task, measured against its gold judge.

    python -m rlhf_jax.pipeline --config=configs/pipeline.py:tiny --workdir=runs/pipeline_tiny

data → pretrain → SFT → sample K responses per prompt from SFT → simulated labelers rank them → RM
→ the policy stage (config.policy: PPO by default, or any algorithm a configs/*.py declares: rlhf_jax.algorithms;
reward = the RM) → evaluation of SFT and the policy on held-out prompts → summary.json, report.md.
Each stage has its own sub-workdir; a finished stage (DONE.json) is skipped on rerun and an
interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from rlhf_jax import algorithms
from rlhf_jax.config import config_module, merge_config
from rlhf_jax.errors import ConfigError, MissingFileError


def policy_stage_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The policy stage's config: the algorithm's settings (configs/<file>.py ALGORITHMS[c.policy]) on top of
    the pipeline's policy-stage settings (its sizes: iterations, batch, lengths, lr), except that every key
    the user set (a value of c.<stage> other than the preset's) keeps the user's value."""
    known = algorithms.algorithms()
    if c.policy not in known:
        raise ConfigError(f"config.policy={c.policy!r} is not an algorithm; use one of {sorted(known)}.")
    a = known[c.policy]
    preset = config_module("pipeline").get_config(c.preset)[a.stage].to_dict()
    mine = c[a.stage].to_dict()
    out = ml_collections.ConfigDict(preset)
    merge_config(out, a.settings, f"configs/{a.file}.py ALGORITHMS[{c.policy!r}]")
    merge_config(out, _changed(mine, preset), f"config.{a.stage}")
    return out


def _changed(mine: dict, preset: dict) -> dict:
    """The entries of `mine` whose values differ from `preset`'s (nested dicts compared key by key)."""
    out = {}
    for k, v in mine.items():
        if isinstance(v, dict) and isinstance(preset.get(k), dict):
            sub = _changed(v, preset[k])
            if sub:
                out[k] = sub
        elif k not in preset or v != preset[k]:
            out[k] = v
    return out


# The pipeline config keys (dotted) each stage's output depends on, its upstream stages' included; a stage of
# config.reuse_from is reused only when all of them are equal. Each data file has its own seed offset
# (write_data), so e.g. more RM prompts leave the corpus and the demonstrations, hence pretrain and SFT, as
# they were. The evaluation of the policy always runs here.
REUSE_KEYS = {
    "pretrain": ("seed", "data.corpus_chars", "pretrain", "pretrained", "data.chat_template", "data.chat_system")
}
REUSE_KEYS["sft"] = REUSE_KEYS["pretrain"] + (
    "data.num_demos",
    "data.demo_error_rate",
    "data.demo_forbidden_prob",
    "data.demo_chatter_rate",
    "sft",
)
REUSE_KEYS["comparisons"] = REUSE_KEYS["sft"] + (
    "data.num_rm_prompts",
    "data.num_rm_eval_prompts",
    "data.k",
    "data.labeler_noise",
    "data.sample_temperature",
    "data.max_prompt_len",
    "data.kinds",
    "eval.max_new_tokens",
    "eval.batch_size",
)  # sampling uses these
REUSE_KEYS["rm"] = REUSE_KEYS["comparisons"] + ("rm",)
# the rows every policy of one SFT / RM shares (prompted, SFT, best-of-n, RM vs gold): decoded once a seed
REUSE_KEYS["baselines"] = REUSE_KEYS["rm"] + ("data.num_eval_prompts", "eval")
REUSE_KEYS["policy"] = REUSE_KEYS["rm"] + ("data.num_ppo_prompts", "policy", "policy_reward", "pg", "dpo")


# The stage each one reads: a stage is reused only with its input. Baselines and the policy both read the RM
# (and what came before it) and not each other, so a run older than the baselines stage still has its policy
# reused.
UPSTREAM = {"pretrain": None, "sft": "pretrain", "comparisons": "sft", "rm": "comparisons", "baselines": "rm"}
UPSTREAM["policy"] = "rm"


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def reusable_stages(c: ml_collections.ConfigDict, base: str) -> dict[str, str]:
    """{stage: base's stage directory} for the stages of the finished pipeline run `base` that this
    config would reproduce (same REUSE_KEYS values, and the stage finished there)."""
    if not base:
        return {}
    path = os.path.join(base, "pipeline_config.json")
    if not os.path.isfile(path):
        raise MissingFileError(
            f"config.reuse_from={base!r}: {path} does not exist. Point it at the workdir of "
            f"a pipeline run (e.g. runs/quickstart after bash scripts/quickstart.sh), or leave "
            f"it empty to run every stage here."
        )
    with open(path) as f:
        theirs = _renamed(json.load(f))
    ours = json.loads(json.dumps(c.to_dict(), default=str))
    # A key added to the code since that run was written ran there as its default: fill it in, so that a
    # new setting whose default keeps the old behaviour does not make every earlier run unusable.
    preset = config_module("pipeline").get_config(theirs.get("preset", c.preset))
    theirs = _with_missing(theirs, json.loads(json.dumps(preset.to_dict(), default=str)))
    ours, theirs = _outputs_only(ours), _outputs_only(theirs)
    out, dirs, reused = {}, stage_dirs(base), set()
    for stage, keys in REUSE_KEYS.items():  # in pipeline order: a stage's input is judged before it
        if UPSTREAM[stage] not in reused | {None} or any(_get(ours, k) != _get(theirs, k) for k in keys):
            continue
        if stage == "pretrain" and c.pretrained:  # no stage ran there: the same pretrained model is the stage
            reused.add(stage)
            continue
        where = dirs.get(stage, os.path.join(base, stage))
        if os.path.isfile(os.path.join(where, "DONE.json")):
            out[stage] = where
            reused.add(stage)
    return out


# A stage's keys that change how it reports (W&B, progress bars), not what it produces: never a reason to rerun it.
REPORTING_KEYS = ("log", "progress")


def _outputs_only(config: dict) -> dict:
    """`config` without each stage block's REPORTING_KEYS."""
    from rlhf_jax.config import STAGES

    return {
        k: {x: y for x, y in v.items() if x not in REPORTING_KEYS} if k in STAGES and isinstance(v, dict) else v
        for k, v in config.items()
    }


def _renamed(config):
    """A pipeline config as written before a rename (config.RENAMED: blocks, at any depth, and stage names)
    under the current names, so that its stages can still be reused."""
    from rlhf_jax.config import RENAMED

    if not isinstance(config, dict):
        return config
    out = {(RENAMED[k] if k in RENAMED and RENAMED[k] not in config else k): _renamed(v) for k, v in config.items()}
    if out.get("stage") in RENAMED:
        out["stage"] = RENAMED[out["stage"]]
    return out


def _with_missing(config: dict, defaults: dict) -> dict:
    """`config` with every key it lacks taken from `defaults` (nested dicts key by key)."""
    out = dict(config)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_missing(out[k], v)
    return out


def stage_dirs(workdir: str) -> dict[str, str]:
    """{stage: directory} a pipeline run used, from <workdir>/stages.json: a stage it reused lives in another
    run's workdir, so reusing from a run that itself reused stages finds them there. {} for older runs."""
    path = os.path.join(workdir, "stages.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] pipeline: {msg}", flush=True)


def once(workdir: str, name: str, fn):
    """Runs fn() unless <workdir>/DONE.json exists; stores and returns its result (a JSON dict), with the
    stage's wall time as "wall_s" (seconds, setup and compilation included)."""
    done = os.path.join(workdir, "DONE.json")
    if os.path.exists(done):
        log(f"{name}: finished earlier, skipped ({workdir})")
        with open(done) as f:
            return json.load(f)
    log(f"{name}: running in {workdir}")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    result = {**fn(), "wall_s": time.perf_counter() - t0}
    with open(done + ".tmp", "w") as f:
        json.dump(result, f, indent=2, default=float)
    os.replace(done + ".tmp", done)
    return result


def write_data(c, data_dir: str) -> dict[str, str]:
    """The built-in task's files: corpus, noisy demonstrations, and disjoint prompt sets."""
    from rlhf_jax.tasks import builtin

    os.makedirs(data_dir, exist_ok=True)
    p = {
        k: os.path.join(data_dir, f)
        for k, f in dict(
            corpus="corpus.txt",
            demos="demonstrations.jsonl",
            demos_eval="demonstrations_eval.jsonl",
            rm_prompts="rm_prompts.jsonl",
            rm_eval_prompts="rm_eval_prompts.jsonl",
            ppo_prompts="ppo_prompts.jsonl",
            eval_prompts="eval_prompts.jsonl",
        ).items()
    }
    d, s = c.data, c.seed
    if c.pretrained:  # no pretraining corpus: the model comes pretrained
        del p["corpus"]
    else:
        builtin.write_builtin_corpus(p["corpus"], num_chars=d.corpus_chars, seed=s)
    demonstrator = dict(
        error_rate=d.demo_error_rate, forbidden_prob=d.demo_forbidden_prob, chatter_rate=d.demo_chatter_rate
    )
    builtin.write_demonstrations(p["demos"], d.num_demos, seed=s + 1, **demonstrator)
    builtin.write_demonstrations(p["demos_eval"], max(d.num_demos // 10, 64), seed=s + 2, **demonstrator)
    kinds = tuple(d.kinds)
    builtin.write_prompts(p["rm_prompts"], d.num_rm_prompts, seed=s + 3, kinds=kinds)
    builtin.write_prompts(p["rm_eval_prompts"], d.num_rm_eval_prompts, seed=s + 4, kinds=kinds)
    builtin.write_prompts(p["ppo_prompts"], d.num_ppo_prompts, seed=s + 5, kinds=kinds)
    builtin.write_prompts(p["eval_prompts"], d.num_eval_prompts, seed=s + 6, split="eval", kinds=kinds)
    return p


def sample_comparisons(c, sft_dir: str, prompts_path: str, out_path: str, noise: float, seed: int, mesh, rules):
    """K samples per prompt from the SFT policy, ranked by simulated labelers → ranked JSONL."""
    from rlhf_jax.data import chat, prompts as prompt_data
    from rlhf_jax.tasks import builtin
    from rlhf_jax.trained import generate, load_policy, sampling_settings

    model, params, tok = load_policy(sft_dir, mesh, rules)
    source, _ = prompt_data.build_prompt_dataset(
        prompts_path,
        "prompt",
        tok.path,
        c.data.max_prompt_len,
        os.path.join(os.path.dirname(out_path), "tfds"),
        template=chat.config_template(c.data),
    )
    settings = sampling_settings(tok, c.eval.max_new_tokens, c.data.sample_temperature, chat.config_template(c.data))
    samples = [
        generate(model, params, tok, source, settings, mesh, rules, seed=seed + j, batch_size=c.eval.batch_size)
        for j in range(c.data.k)
    ]
    with open(prompts_path) as f:
        instructions = [json.loads(line)["messages"][-1]["content"] for line in f if line.strip()]
    per_prompt = [[s["responses"][i] for s in samples] for i in range(len(instructions))]
    builtin.write_comparisons(out_path, instructions, per_prompt, seed=seed, noise=noise)
    return {"path": out_path, "prompts": len(instructions), "k": c.data.k, "noise": noise}


def pretrained_dir(path: str) -> str:
    """config.pretrained as an absolute path, checked: a local Hugging Face model directory."""
    from rlhf_jax import hf

    if not hf.is_hf_dir(path):
        raise MissingFileError(
            f"config.pretrained={path!r} is not a Hugging Face model directory (config.json + model.safetensors). "
            f"For SmolLM2-135M-Instruct: bash scripts/setup_real.sh, then python -m rlhf_jax.convert gguf "
            f"--out={path}."
        )
    return os.path.abspath(path)


def run_pipeline(c: ml_collections.ConfigDict, workdir: str) -> dict:
    from rlhf_jax import parallel, pipeline_eval
    from rlhf_jax.stages import run_stage

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "pipeline_config.json"), "w") as f:
        json.dump(c.to_dict(), f, indent=2, default=str)
    sub = {k: os.path.join(workdir, k) for k in ("pretrain", "sft", "comparisons", "rm", "baselines", "policy", "eval")}
    reused = reusable_stages(c, os.path.abspath(c.reuse_from) if c.reuse_from else "")
    for name, path in reused.items():
        if os.path.abspath(path) != sub[name]:
            log(f"{name}: reused from {path} (same config)")
            sub[name] = path
    if c.pretrained:  # the pretrain stage is the pretrained model: stages.json names it, not a directory never made
        sub["pretrain"] = pretrained_dir(c.pretrained)
    with open(os.path.join(workdir, "stages.json"), "w") as f:
        json.dump(sub, f, indent=2)
    paths = write_data(c, os.path.join(workdir, "data"))
    mesh = parallel.make_mesh({a: c.mesh[a] for a in parallel.MESH_AXES})
    rules = parallel.DEFAULT_RULES

    def stage(name, **extra):
        # a copy: the wiring below is per run
        cfg = policy_stage_config(c) if name == "policy" else ml_collections.ConfigDict(c[name].to_dict())
        for k, v in extra.items():
            node = cfg
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
        cfg.mesh.update({a: c.mesh[a] for a in parallel.MESH_AXES})
        if name != "pretrain":  # every stage renders the task's dialogues as the evaluation does
            cfg.data.update({k: c.data[k] for k in ("chat_template", "chat_system")})
        return cfg

    if c.policy_reward not in ("rm", "gold"):
        raise ConfigError(
            f"config.policy_reward={c.policy_reward!r}: use 'rm' (the trained RM) or 'gold' (the gold judge)."
        )
    policy_stage_config(c)  # an unknown policy fails before anything runs
    t0 = time.perf_counter()
    if c.pretrained:
        log(f"pretrain: the pretrained model {sub['pretrain']}")
    else:
        once(
            sub["pretrain"],
            "pretrain",
            lambda: run_stage(stage("pretrain", **{"data.path": paths["corpus"]}), sub["pretrain"]),
        )
    once(
        sub["sft"],
        "sft",
        lambda: run_stage(
            stage(
                "sft",
                init_from=sub["pretrain"],
                **{"data.train_path": paths["demos"], "data.eval_path": paths["demos_eval"]},
            ),
            sub["sft"],
        ),
    )
    comps = os.path.join(sub["comparisons"], "train.jsonl")
    gold_comps = os.path.join(sub["comparisons"], "eval_gold.jsonl")
    once(
        sub["comparisons"],
        "sample K per prompt + simulated labelers",
        lambda: {
            "train": sample_comparisons(
                c, sub["sft"], paths["rm_prompts"], comps, c.data.labeler_noise, c.seed + 10, mesh, rules
            ),
            "eval_gold": sample_comparisons(
                c, sub["sft"], paths["rm_eval_prompts"], gold_comps, 0.0, c.seed + 20, mesh, rules
            ),
        },
    )
    rm = once(
        sub["rm"],
        "rm",
        lambda: run_stage(
            stage(
                "rm",
                init_from=sub["sft"],
                **{"data.train_path": comps, "data.eval_path": gold_comps, "data.format": "ranked"},
            ),
            sub["rm"],
        ),
    )
    gold = "rlhf_jax.tasks.builtin:gold_reward"
    reward = (
        {"reward.kind": "rm", "reward.rm_workdir": sub["rm"]}
        if c.policy_reward == "rm"
        else {"reward.kind": "function", "reward.function": gold}
    )
    wiring = {"data.prompts_path": paths["ppo_prompts"], "reward.monitor": gold, **reward}
    if algorithms.algorithms()[c.policy].stage == "pg" and "corpus" in paths:
        wiring["data.ptx_path"] = paths["corpus"]
    else:  # DPO trains on the RM's comparisons (the same labeler budget); online DPO ranks by the reward
        wiring.update({"data.train_path": comps, "data.eval_path": gold_comps, "data.format": "ranked"})
    baselines = once(
        sub["baselines"],
        "baselines (prompted, SFT, best-of-n, RM vs gold)",
        lambda: pipeline_eval.evaluate_baselines(c, sub, paths, rm, mesh, rules),
    )
    once(sub["policy"], c.policy, lambda: run_stage(stage("policy", init_from=sub["sft"], **wiring), sub["policy"]))
    summary = once(sub["eval"], "evaluation", lambda: pipeline_eval.evaluate(c, sub, paths, baselines, mesh, rules))
    pipeline_eval.write_report(c, workdir, sub, summary, time.perf_counter() - t0)
    log(f"done: {os.path.join(workdir, 'report.md')}")
    return summary


def main(argv):
    from absl import app, logging

    from rlhf_jax import distributed

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    distributed.initialize()
    run_pipeline(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from rlhf_jax import cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pipeline.py:<preset>", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "runs/pipeline", "Directory for every stage's sub-workdir.")
    flags.mark_flags_as_required(["config"])
    import sys

    from rlhf_jax.config import check_renamed_flags

    check_renamed_flags(sys.argv)  # an old key fails naming its new name, before absl's "no such key"
    cli.run(main)
