"""scripts/check_pipeline.py: mean ± std over seeds and the claim's two checks."""

import importlib.util
import os

import pytest

from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("check_pipeline", os.path.join(ROOT, "scripts", "check_pipeline.py"))
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def row(seed, win, sft_harm, ppo_harm, status="finished"):
    return {
        "seed": seed,
        "status": status,
        "sft/gold_score": 0.4,
        "policy/gold_score": 0.5,
        "policy/win_rate_vs_sft": win,
        "sft/harmful_rate": sft_harm,
        "policy/harmful_rate": ppo_harm,
        "policy/kl": 1.0,
        "rm/accuracy_vs_gold": 0.7,
    }


def test_the_claim_holds_on_the_mean_over_seeds_and_every_seed_must_have_finished():
    v = check.verdict([row(0, 0.70, 0.05, 0.01), row(1, 0.62, 0.04, 0.02), row(2, 0.69, 0.06, 0.00)], 0.65)
    assert v["passed"] and v["mean_std"]["policy/win_rate_vs_sft"]["mean"] == pytest.approx(0.67)
    assert v["mean_std"]["policy/win_rate_vs_sft"]["std"] == pytest.approx(0.04359, abs=1e-4)  # sample std
    assert "| mean ± std | 0.400 ± 0.000 | 0.500 ± 0.000 | 0.670 ± 0.044 |" in "\n".join(check.markdown(v))
    v = check.verdict([row(0, 0.70, 0.05, 0.06), row(1, 0.70, 0.05, 0.05)], 0.65)
    assert not v["passed"] and v["checks"] == {
        "mean win rate vs SFT >= 0.65": True,
        "mean harmful rate PPO < SFT": False,
    }
    v = check.verdict([row(0, 0.70, 0.05, 0.0), row(1, 0.0, 0.0, 0.0, status="started")], 0.65)
    assert v["seeds"] == [0] and not v["passed"]  # an unfinished seed fails the check
    with pytest.raises(SystemExit, match="no seed finished"):
        check.verdict([row(0, 0.7, 0.1, 0.0, status="not run")], 0.65)
