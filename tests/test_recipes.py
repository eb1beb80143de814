"""Recipes on public data run end to end at tiny scale: the shared HH-RLHF file goes through the
HH builders into SFT and RM, TL;DR-format files (posts; comparisons as PPO prompts) through SFT → PPO,
each stage as `python -m rlhf_jax.main --config=configs/<recipe>.py:tiny_<stage>` would run it."""

import gzip
import json
import math
import os

import pytest

import configs.hh_rlhf as hh_recipe
import configs.tldr as tldr_recipe
from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import run_stage
from tests.conftest import SHARED_DATA

HH_DEV = os.path.join(SHARED_DATA, "hh_rlhf_harmless_dev.jsonl.gz")


def _run(recipe, preset, workdir, **overrides):
    c = recipe.get_config(preset)
    for key, value in overrides.items():  # as --config.<key>=<value> on the command line
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.progress = False
    c.lock()
    return run_stage(c, str(workdir))


def _finite(metrics):
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


@pytest.mark.skipif(
    not os.path.exists(HH_DEV),
    reason=f"reference data {HH_DEV} is absent (the HH-RLHF harmless-base test sample under ../shared/data)",
)
@pytest.mark.slow
def test_hh_rlhf_file_trains_sft_and_rm(tmp_path):
    sft = _run(
        hh_recipe,
        "tiny_sft",
        tmp_path / "sft",
        **{"data.train_path": HH_DEV, "data.train_lines": (0, 64), "num_steps": 6, "log_every": 3, "model.n_layers": 1},
    )
    logged = read_metrics(str(tmp_path / "sft"))
    assert _finite(sft)
    assert [m["step"] for m in logged if "train/loss" in m] == [3, 6]
    meta = json.load(open(tmp_path / "sft" / "config.json"))
    assert meta["data"]["chat_template"] == "hh" and meta["data"]["format"] == "hh_rlhf"

    rm = _run(
        hh_recipe,
        "tiny_rm",
        tmp_path / "rm",
        **{
            "data.train_path": HH_DEV,
            "data.train_lines": (0, 64),
            "data.eval_lines": (1500, 1532),
            "num_steps": 4,
            "eval_every": 4,
            "log_every": 2,
            "init_from": str(tmp_path / "sft"),
        },
    )
    assert _finite(rm) and 0.0 <= rm["eval/rm/accuracy"] <= 1.0
    assert json.load(open(tmp_path / "rm" / "config.json"))["data"]["chat_template"] == "hh"


def _tldr_files(d):
    posts = [
        {
            "subreddit": "cats",
            "title": f"cat {i} ignores me",
            "post": f"She sits by door {i}.\nShe eats and leaves.\nWhat should I do?",
            "summary": f"cat {i} is aloof",
        }
        for i in range(24)
    ]
    pairs = [[{"text": " cat is aloof"}, {"text": " " + "x" * (i % 5 + 1)}] for i in range(len(posts))]
    comps = [
        {
            "info": {k: p[k] for k in ("subreddit", "title", "post")},
            "summaries": pair[:: 1 - 2 * (i % 2)],
            "choice": i % 2,
        }
        for i, (p, pair) in enumerate(zip(posts, pairs))
    ]  # the aloof summary always wins
    paths = {}
    for name, rows in (("train.jsonl", posts), ("comparisons.jsonl.gz", comps)):
        paths[name] = str(d / name)
        with (gzip.open if name.endswith(".gz") else open)(paths[name], "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths["train.jsonl"], paths["comparisons.jsonl.gz"]


@pytest.mark.slow
def test_tldr_recipe_trains_sft_and_ppo_on_tldr_files(tmp_path):
    posts, comps = _tldr_files(tmp_path)
    sft = _run(
        tldr_recipe,
        "tiny_sft",
        tmp_path / "sft",
        **{"data.train_path": posts, "num_steps": 4, "log_every": 2, "model.n_layers": 1},
    )
    assert _finite(sft) and "train/loss" in sft
    # The TL;DR comparisons go through the same RM stage as HH's above (their builder: test_public_datasets.py);
    # a third compile here would only repeat it.
    # the tiny preset's programmatic reward keeps this to one compile of the rollout and the update
    ppo = _run(
        tldr_recipe,
        "tiny_ppo",
        tmp_path / "ppo",
        **{"data.prompts_path": comps, "num_steps": 1, "init_from": str(tmp_path / "sft")},
    )
    assert _finite(ppo) and "objective/scores" in ppo


@pytest.mark.parametrize("recipe", [hh_recipe, tldr_recipe])
def test_every_recipe_preset_is_a_valid_config(recipe):
    from rlhf_jax import config as config_lib

    for size in recipe.SIZES:
        for stage in recipe.STAGES:
            c = recipe.get_config(f"{size}_{stage}")
            config_lib.validate(c)
            assert c.stage == {"ppo": "pg"}.get(stage, stage)  # <size>_ppo: PPO, run by the pg stage
            assert c.data.chat_template in ("hh", "plain")
    with pytest.raises(ValueError, match="unknown preset 'gpt3_sft'"):
        recipe.get_config("gpt3_sft")
