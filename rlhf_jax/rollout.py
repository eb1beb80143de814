"""What every online algorithm shares — PPO and its family, online DPO: the prompts, sampling responses
with the KV cache, the reward source (a trained RM or a Python function), per-episode PRNG keys, and
the samples log. No algorithm lives here.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.run import Run
from rlhf_jax.sampling import SamplingSettings, sample


def stop_id(c, tok) -> int:
    """The token that ends a response: by default the chat template's end of an assistant turn
    (<|end|> for tags, eos for the text templates)."""
    from rlhf_jax.data import chat

    s = c.rollout.stop_token
    if s == "end":
        return chat.config_template(c.data).end_id(tok)
    if s == "eos":
        return tok.eos_id
    return int(s)


def make_rollout_fn(model, c, tok):
    """(params, prompt [B, P], prompt_mask, keys [B, 2]) → sample(...) with config.rollout's settings, the
    sampler's own log-probs included; jit it."""
    settings = SamplingSettings(max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                                top_k=c.rollout.top_k, top_p=c.rollout.top_p, eos_id=stop_id(c, tok),
                                pad_id=tok.pad_id, eos_after=c.rollout.eos_after, logprobs=True)
    return lambda params, prompt, prompt_mask, keys: sample(params, prompt, prompt_mask, keys, model=model,
                                                            settings=settings)


def prompt_data(run: Run):
    """(tokenizer, prompt source) of config.data.prompts_path (empty: built-in prompts written here)."""
    from rlhf_jax.data import builtin_text, chat, prompts, tokenizer

    c = run.config
    data_dir = os.path.join(run.workdir, "data")
    path, fmt = c.data.prompts_path, c.data.prompts_format
    if not path:
        path, fmt = os.path.join(data_dir, "builtin_prompts.jsonl"), "prompt"
        if run.is_main:
            _write_builtin_prompts(path, data_dir, c.seed)
    corpus = os.path.join(data_dir, "builtin_corpus.txt")
    if not (c.data.tokenizer_path or c.init_from) and run.is_main:
        builtin_text.write_builtin_corpus(corpus, seed=c.seed)
    tok = tokenizer.run_tokenizer(c, run.workdir, [corpus], run.is_main)
    source, stats = run.main_first(prompts.build_prompt_dataset, path, fmt, tok.path, c.data.max_prompt_len,
                                   data_dir, line_range=tuple(c.data.prompts_lines) or None,
                                   template=chat.config_template(c.data))
    run.log(f"prompts {path}: {stats}")
    return tok, source


def _write_builtin_prompts(path: str, data_dir: str, seed: int):
    from rlhf_jax.tasks import builtin

    os.makedirs(data_dir, exist_ok=True)
    builtin.write_prompts(path, 512, seed=seed + 7, split="train")


def prompt_batch(loader, iteration: int, group: int, run: Run):
    """This iteration's prompts, each `group` times in a row (the samples of one prompt), as global arrays."""
    local = loader.get_batch(iteration)
    return parallel.global_batch({"prompt": np.repeat(local["prompt_tokens"], group, axis=0),
                                  "prompt_mask": np.repeat(local["prompt_mask"], group, axis=0)}, run.mesh, run.rules)


def reward(run: Run, c):
    """(rm (model, norm) or None, rm params or None, Python reward function or None)."""
    from rlhf_jax.preference import AGGREGATES

    if c.reward.aggregate not in AGGREGATES:
        raise ValueError(f"config.reward.aggregate={c.reward.aggregate!r}: use one of {AGGREGATES}.")
    if c.reward.lcb_coef < 0:
        raise ValueError(f"config.reward.lcb_coef={c.reward.lcb_coef} must be >= 0 (the reward is mean − λ·std).")
    if c.reward.kind == "rm":
        if not c.reward.rm_workdir:
            raise ValueError("config.reward.rm_workdir is empty: set it to a trained RM's --workdir, "
                             "or use --config.reward.kind=function with config.reward.function=module:fn.")
        from rlhf_jax.trained import load_reward_model

        rm_model, rm_params, norm = load_reward_model(c.reward.rm_workdir, run.mesh, run.rules, c.model.dtype)
        if c.reward.aggregate != "mean" and norm["ensemble_size"] == 1:
            raise ValueError(f"config.reward.aggregate={c.reward.aggregate!r} combines an RM ensemble's members, but "
                             f"{c.reward.rm_workdir} is one RM (for which it equals its score). Train an ensemble "
                             f"(--config.rm.ensemble_size=4) or use reward.aggregate='mean'.")
        run.log(f"reward: {c.reward.rm_workdir}" + (f", {c.reward.aggregate} of an ensemble of {norm['ensemble_size']}"
                                                    if norm["ensemble_size"] > 1 else ""))
        return (rm_model, norm), rm_params, None
    if c.reward.aggregate != "mean":
        raise ValueError(f"config.reward.aggregate={c.reward.aggregate!r} applies to an RM ensemble; "
                         f"reward.kind={c.reward.kind!r} has none. Use reward.aggregate='mean'.")
    if c.reward.kind == "function":
        return None, None, import_function(c.reward.function, "reward.function")
    raise ValueError(f"config.reward.kind={c.reward.kind!r}: use 'rm' or 'function'.")


def rm_score_fn(rm, c):
    """(rm_params, tokens, mask [N, L]) → (reward [N]: the RM's normalised score, or its ensemble members'
    combined by config.reward.aggregate; the members' mean [N] and std [N], std 0 for one RM)."""
    from rlhf_jax import forward, preference

    rm_model, norm = rm

    def score(rm_params, tokens, mask):
        s = forward.member_scores(rm_params, rm_model, norm, tokens, mask)
        return preference.aggregate_rewards(s, c.reward.aggregate, c.reward.lcb_coef), s.mean(0), s.std(0)

    return score


def import_function(spec: str, key: str):
    """'package.module:function' → the function."""
    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"config.{key}={spec!r} cannot be imported ({e}); give it as 'package.module:function'.") from e


def decode_batch(tok, batch) -> tuple[list[str], list[str]]:
    prompts, pmask = parallel.to_host(batch["prompt"]), parallel.to_host(batch["prompt_mask"])
    resp, rmask = parallel.to_host(batch["response"]), parallel.to_host(batch["response_mask"])
    p_text = [tok.decode([int(t) for t, m in zip(row, mk) if m]) for row, mk in zip(prompts, pmask)]
    r_text = [tok.decode([int(t) for t, m in zip(row, mk) if m]) for row, mk in zip(resp, rmask)]
    return p_text, r_text


def function_scores(fn, tok, batch, run: Run):
    """Scores from a Python function fn(prompts, responses, tokens, mask) -> [B] floats."""
    p_text, r_text = decode_batch(tok, batch)
    tokens, mask = parallel.to_host(batch["response"]), parallel.to_host(batch["response_mask"])
    scores = np.asarray(fn(p_text, r_text, tokens, mask), np.float32)
    if scores.shape != (len(r_text),):
        raise ValueError(f"config.reward.function returned shape {scores.shape}; expected ({len(r_text)},).")
    return jax.device_put(scores, parallel.batch_sharding(run.mesh, run.rules, 1))


def sample_keys(seed: int, iteration: int, B: int, run: Run):
    """One PRNG key per episode (B per iteration), from (seed, global episode index): independent of
    batching and topology."""
    p, n = jax.process_index(), jax.process_count()
    idx = iteration * B + np.arange(p * B // n, (p + 1) * B // n)
    base = jax.random.PRNGKey(seed)
    keys = np.asarray(jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(base, i)))(jnp.asarray(idx)))
    return parallel.global_batch({"k": keys}, run.mesh, run.rules)["k"]


def joined(batch):
    """(tokens, mask) [B, P + N] of a split rollout batch: prompt and response side by side."""
    return (jnp.concatenate([batch["prompt"], batch["response"]], axis=1),
            jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1))


def write_samples(path: str, writer, step: int, tok, batch, scores, run: Run, n: int = 8):
    p_text, r_text = decode_batch(tok, batch)
    rows = [{"step": step, "prompt": p, "response": r, "score": float(s)}
            for p, r, s in list(zip(p_text, r_text, np.asarray(scores)))[:n]]
    if run.is_main:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        table = "| prompt | response | score |\n|---|---|---|\n" + "".join(
            f"| {r['prompt']!r} | {r['response']!r} | {r['score']:.3f} |\n" for r in rows)
        writer.write_text(step, "samples", table)
