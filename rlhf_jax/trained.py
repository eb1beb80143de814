"""Trained models from finished workdirs (policies, reward models), batched generation and response
log-probs — for the evaluation, the stages that start from another stage's output, and notebooks.

    model, params, tok = load_policy("runs/quickstart/policy", mesh, rules)
    out = generate(model, params, tok, prompt_source, settings, mesh, rules, seed=0, batch_size=64)
    rm_model, rm_params, norm = load_reward_model("runs/quickstart/rm", mesh, rules)
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from rlhf_jax import checkpoint, forward, parallel, train_state
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.models.gpt import TransformerLM
from rlhf_jax.models.layers import ModelConfig
from rlhf_jax.sampling import SamplingSettings, example_keys, sample

NORM_FILE = "reward_norm.json"  # the RM stage's reward normalisation, beside its checkpoints


def sampling_settings(tok, max_new_tokens: int, temperature: float, template=None) -> SamplingSettings:
    """Decoding for the evaluation and for sampling comparisons: stop at the end of an assistant turn of the
    chat template (rlhf_jax/data/chat.py; default: the project's tags)."""
    from rlhf_jax.data import chat

    return SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=(template or chat.TAGS).end_id(tok),
        pad_id=tok.pad_id,
    )


def load_policy(workdir: str, mesh, rules, dtype: str | None = None):
    """(model, params, tokenizer) of a pretrain / SFT / policy-gradient / DPO workdir (of a policy-gradient one: the
    policy, not its critic), or of a Hugging Face model directory (e.g. `python -m rlhf_jax.convert gguf`'s)."""
    from rlhf_jax import hf

    if hf.is_hf_dir(workdir):
        model, params = hf.load_model(workdir, mesh, rules, dropout=0.0, **({"dtype": dtype} if dtype else {}))
        return model, params, load_tokenizer(workdir)
    src = checkpoint.read_run_config(workdir)
    if src is None:
        raise FileNotFoundError(f"{workdir!r} has no config.json: not a finished run's --workdir.")
    model = TransformerLM(ModelConfig(**dict(src["model"], dropout=0.0, **({"dtype": dtype} if dtype else {}))))
    one = train_state.model_init_fn(model, 8, 0)
    # The policy-gradient family keeps {"policy", ["critic"]}; runs written before its rename call it "ppo".
    if src["stage"] in ("pg", "ppo"):
        critic = src.get("pg", src.get("ppo"))["critic"] == "reward_model"
        like = parallel.abstract_params(lambda: {"policy": one(), **({"critic": one()} if critic else {})}, mesh, rules)
        params = checkpoint.load_params(workdir, like)["policy"]
    else:
        like = parallel.abstract_params(one, mesh, rules)
        params = checkpoint.load_params(workdir, like)
    return model, params, load_tokenizer(os.path.join(workdir, "tokenizer.model"))


def generate(model, params, tok, source, settings: SamplingSettings, mesh, rules, seed: int, batch_size: int):
    """Samples one response per prompt record of `source` (prompt_tokens / prompt_mask, left-padded).

    Returns numpy arrays prompt [N, P], prompt_mask, response [N, T], response_mask, and decoded
    lists prompts / responses. Key of example i = fold_in(PRNGKey(seed), i): independent of batch size.
    """
    from rlhf_jax.data.loader import eval_batches

    fn = jax.jit(functools.partial(sample, model=model, settings=settings))
    out = {"prompt": [], "prompt_mask": [], "response": [], "response_mask": []}
    start = 0
    with parallel.activate(mesh, rules):
        for local in eval_batches(source, batch_size):
            idx = start + np.arange(len(local["prompt_tokens"]))
            keys = example_keys(seed, idx)
            g = parallel.global_batch({"p": local["prompt_tokens"], "m": local["prompt_mask"], "k": keys}, mesh, rules)
            r = jax.device_get(fn(params, g["p"], g["m"], g["k"]))
            real = local["prompt_mask"].sum(1) > 0  # eval_batches pads the last batch with empty rows
            out["prompt"].append(local["prompt_tokens"][real])
            out["prompt_mask"].append(local["prompt_mask"][real])
            out["response"].append(r["tokens"][real])
            out["response_mask"].append(r["mask"][real])
            start += int(real.sum())
    res = {k: np.concatenate(v) for k, v in out.items()}
    res["prompts"] = [tok.decode_markup(row[m > 0].tolist()) for row, m in zip(res["prompt"], res["prompt_mask"])]
    res["responses"] = [tok.decode(row[m > 0].tolist()) for row, m in zip(res["response"], res["response_mask"])]
    return res


def response_logprobs(model, params, batch, temperature: float, mesh, rules, batch_size: int) -> np.ndarray:
    """Σ_t log π(response_t | prompt, response_<t) per sequence [N] (nats), for KL estimates."""
    fn = jax.jit(functools.partial(forward.response_logprob_sums, model=model, temperature=temperature))
    n, out = len(batch["prompt"]), []
    with parallel.activate(mesh, rules):
        for i in range(0, n, batch_size):
            sl = {k: batch[k][i : i + batch_size] for k in ("prompt", "prompt_mask", "response", "response_mask")}
            pad = batch_size - len(sl["prompt"])
            if pad:  # keep one compiled shape; padded rows are dropped below
                sl = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in sl.items()}
                sl["prompt_mask"][-pad:, -1] = 1
            g = parallel.global_batch(sl, mesh, rules)
            lp = np.asarray(
                jax.device_get(
                    fn(
                        params,
                        prompt=g["prompt"],
                        prompt_mask=g["prompt_mask"],
                        response=g["response"],
                        response_mask=g["response_mask"],
                    )
                )
            )
            out.append(lp[: batch_size - pad])
    return np.concatenate(out)


def load_reward_model(workdir: str, mesh, rules, dtype: str | None = None):
    """(model, params, norm) of a finished RM workdir, params of its latest checkpoint sharded on `mesh`;
    norm = {"gain", "bias", "ensemble_size", ...} from its reward_norm.json. `dtype` overrides the compute dtype.
    An ensemble (rm.ensemble_size = E > 1) has params with a leading member axis and E gains and biases.

    Score with `forward.score_sequences(params, model, norm, tokens, input_mask)` (an ensemble's members
    combined by its `aggregate`) or `forward.member_scores` ([E, N]); jit it as you like.
    """
    src = checkpoint.read_run_config(workdir)
    if src is None:
        raise FileNotFoundError(f"{workdir!r} is not an RM workdir (no config.json). Train one with configs/rm.py.")
    norm = load_reward_norm(workdir)
    model = TransformerLM(ModelConfig(**dict(src["model"], dropout=0.0, **({"dtype": dtype} if dtype else {}))))
    members = norm["ensemble_size"]
    init = train_state.ensemble_init_fn(model, 8, 0, members) if members > 1 else train_state.model_init_fn(model, 8, 0)
    params = checkpoint.load_params(workdir, parallel.abstract_params(init, mesh, rules))
    return model, params, norm


def load_reward_norm(workdir: str) -> dict:
    """{"gain", "bias", "ensemble_size", ...} of a finished RM workdir (its reward_norm.json), checked to
    describe the params of its latest checkpoint."""
    norm_path = os.path.join(workdir, NORM_FILE)
    if not os.path.exists(norm_path):
        raise FileNotFoundError(
            f"{norm_path} is missing: the RM run in {workdir} did not finish. Rerun its command to finish it."
        )
    with open(norm_path) as f:
        norm = {"ensemble_size": 1, **json.load(f)}
    _, step = checkpoint.find_params_checkpoint(workdir)
    if norm.get("step", step) != step:  # e.g. a run extended past a finished one, then stopped midway
        raise ValueError(
            f"{norm_path} describes the params of step {norm['step']} but the latest checkpoint in "
            f"{workdir} is step {step}: that run stopped before finishing. Rerun its command to "
            f"finish it."
        )
    return norm
