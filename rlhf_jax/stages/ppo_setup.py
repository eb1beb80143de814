"""The PPO stage's plumbing — data, initial params, the reward source, keys, samples —
kept out of `ppo.py` so that file reads as the algorithm."""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, parallel, train_state
from rlhf_jax.run import RUNTIME_MODEL_FIELDS, Run


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


def datasets(run: Run):
    """(tokenizer, prompt source, pretraining source for PPO-ptx or None)."""
    from rlhf_jax.data import builtin_text, chat, lm_datasets, prompts

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
    tok = run.tokenizer([corpus])
    tok_path = os.path.join(run.workdir, "tokenizer.model")
    source, stats = run.main_first(prompts.build_prompt_dataset, path, fmt, tok_path, c.data.max_prompt_len,
                                   data_dir, line_range=tuple(c.data.prompts_lines) or None,
                                   template=chat.config_template(c.data))
    run.log(f"prompts {path}: {stats}")
    ptx = None
    if c.ppo.ptx_coef > 0:
        text = c.data.ptx_path or corpus
        if not c.data.ptx_path and run.is_main:
            builtin_text.write_builtin_corpus(corpus, seed=c.seed)
        ptx = run.main_first(lm_datasets.build_text_dataset, text, tok_path, c.data.ptx_seq_len, data_dir)["train"]
    return tok, source, ptx


def _write_builtin_prompts(path: str, data_dir: str, seed: int):
    from rlhf_jax.tasks import builtin

    os.makedirs(data_dir, exist_ok=True)
    builtin.write_prompts(path, 512, seed=seed + 7, split="train")


def init_params_fn(model, c):
    """Boxed {"policy": ..., ["critic": ...]} for sharded init."""
    one = train_state.model_init_fn(model, 8, c.seed)
    if c.ppo.critic == "reward_model":
        return lambda: {"policy": one(), "critic": one()}
    return lambda: {"policy": one()}


def frozen_reference(run: Run, model, policy_like):
    """The reference (SFT) policy: the init_from params, frozen. A copy, never donated."""
    params = run.load_init_params(policy_like, heads=tuple(policy_like.keys()))
    return jax.tree.map(jnp.copy, params)


def initial_params(run: Run, model, params):
    """Policy trunk + LM head from init_from; a zero value head (lm-human-preferences).
    With ppo.critic="reward_model", the critic starts as the RM with its reward head as value head (InstructGPT)."""
    out = {"policy": run.load_init_params(params["policy"], heads=("trunk", "lm_head"))}
    if "critic" in params:
        rm_dir = run.config.reward.rm_workdir
        arch = lambda m: {k: v for k, v in (m or {}).items() if k not in RUNTIME_MODEL_FIELDS}
        if arch((checkpoint.read_run_config(rm_dir) or {}).get("model")) != arch(run.config.model.to_dict()):
            raise ValueError("config.ppo.critic='reward_model' needs the RM to have the policy's architecture; "
                             "use ppo.critic='shared' or train the RM from the same SFT workdir.")
        critic = checkpoint.load_params(rm_dir, params["critic"])
        # A copy, not an alias: the train state is donated, and one buffer must not back two leaves.
        out["critic"] = {**critic, "value_head": jax.tree.map(jnp.copy, critic["reward_head"])}
    return out


def reward(run: Run, c):
    """(rm (model, norm) or None, rm params or None, Python reward function or None)."""
    if c.reward.kind == "rm":
        if not c.reward.rm_workdir:
            raise ValueError("config.reward.rm_workdir is empty: set it to a trained RM's --workdir, "
                             "or use --config.reward.kind=function with config.reward.function=module:fn.")
        from rlhf_jax.stages.rm import load_reward_model

        rm_model, rm_params, norm = load_reward_model(c.reward.rm_workdir, run.mesh, run.rules, c.model.dtype)
        return (rm_model, norm), rm_params, None
    if c.reward.kind == "function":
        return None, None, import_function(c.reward.function, "reward.function")
    raise ValueError(f"config.reward.kind={c.reward.kind!r}: use 'rm' or 'function'.")


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


def check_batch(c) -> int:
    """rollout.samples_per_prompt, checked against batch_size, ppo.num_minibatches, the process count and
    ppo.score_baseline."""
    k, B, base, M = c.rollout.samples_per_prompt, c.batch_size, c.ppo.score_baseline, c.ppo.num_minibatches
    if M < 1 or B % M:
        raise ValueError(f"config.batch_size={B} episodes do not split into ppo.num_minibatches={M} equal "
                         f"minibatches; pick num_minibatches dividing batch_size (e.g. 4 with 64).")
    if k < 1 or B % k or (B // k) % jax.process_count():
        raise ValueError(f"config.rollout.samples_per_prompt={k} must be >= 1 and divide batch_size={B} into a "
                         f"number of prompts that divides by the {jax.process_count()} process(es); e.g. "
                         f"samples_per_prompt=4 with batch_size=64.")
    if base not in ("none", "loo"):
        raise ValueError(f"config.ppo.score_baseline={base!r}: use 'none' or 'loo' (leave-one-out mean of the "
                         f"prompt's other samples).")
    if base == "loo" and k < 2:
        raise ValueError("config.ppo.score_baseline='loo' needs config.rollout.samples_per_prompt >= 2 (a "
                         "prompt's other samples are its baseline).")
    return k


def sample_keys(seed: int, iteration: int, B: int, run: Run):
    """One PRNG key per episode (B per iteration), from (seed, global episode index): independent of
    batching and topology."""
    p, n = jax.process_index(), jax.process_count()
    idx = iteration * B + np.arange(p * B // n, (p + 1) * B // n)
    base = jax.random.PRNGKey(seed)
    keys = np.asarray(jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(base, i)))(jnp.asarray(idx)))
    return parallel.global_batch({"k": keys}, run.mesh, run.rules)["k"]


def ptx_batches(loader, iteration: int, n_updates: int, run: Run):
    """The pretraining batch for every minibatch update of this iteration, flat [n_updates * b, L+1]."""
    if loader is None:
        return None
    return parallel.global_batch(loader.get_batch(iteration), run.mesh, run.rules)


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
