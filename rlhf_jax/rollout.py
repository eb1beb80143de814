"""What every online algorithm shares — the policy-gradient family, online DPO: the prompts, the rollout
record, sampling responses with the KV cache, per-episode PRNG keys, and the samples log. No algorithm
lives here; the reward sources are `rlhf_jax.rewards`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.run import Run
from rlhf_jax.sampling import SamplingSettings, example_keys, sample

Array = jax.Array


@flax.struct.dataclass
class Rollout:
    """B episodes (one prompt and one sampled response each; `group` consecutive episodes share a prompt),
    filled in along one iteration: generate → score → advantages (stages/pg.py). Every leaf is [B, ...],
    so a minibatch is `jnp.take` of each. A field the iteration has not reached, or one its settings do not
    use (values and returns without a critic), is None. Log-probs, KL and entropy in nats per token."""

    # generate: make_rollout_fn
    prompt: Array  # int32 [B, P], left-padded
    prompt_mask: Array  # int32 [B, P]
    response: Array  # int32 [B, N], padded after the stop token
    response_mask: Array  # int32 [B, N]: 1 up to and including the stop token
    ended: Array  # bool [B]: the stop token was sampled
    sampler_logprobs: Array  # f32 [B, N]: the KV-cache sampler's log-probs of the drawn tokens
    prompt_index: Array | None = None  # int32 [B]: the prompt record's index (data.prompts.prompt_columns)
    # score
    logprobs: Array | None = None  # f32 [B, N]: the policy's (a full forward at the sampling temperature)
    entropy: Array | None = None  # f32 [B, N]
    values: Array | None = None  # f32 [B, N]: the critic's, before each token
    ref_logprobs: Array | None = None  # f32 [B, N]: the frozen reference policy's
    reward: Any = None  # rlhf_jax.rewards.Scores: the reward source's score [B] (an RM's member statistics)
    # advantages
    scores: Array | None = None  # f32 [B]: reward.score after the missing-EOS penalty and the clip
    rewards: Array | None = None  # f32 [B, N]: per token, the score on the last (−β·KL_t on each in the reward)
    kl: Array | None = None  # f32 [B, N]: the KL estimate per token
    non_score_reward: Array | None = None  # f32 [B, N]: −β·KL_t (0 with the KL in the loss)
    advantages: Array | None = None  # f32 [B, N]
    returns: Array | None = None  # f32 [B, N]: the critic's targets


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
    """(params, prompt [B, P], prompt_mask, keys [B, 2]) → the Rollout of one response per prompt row, sampled
    with config.rollout's settings (the sampler's own log-probs included); jit it."""
    settings = SamplingSettings(
        max_new_tokens=c.rollout.max_new_tokens,
        temperature=c.rollout.temperature,
        top_k=c.rollout.top_k,
        top_p=c.rollout.top_p,
        eos_id=stop_id(c, tok),
        pad_id=tok.pad_id,
        eos_after=c.rollout.eos_after,
        logprobs=True,
        stop_check_every=8 if c.rollout.get("length_bucket", 0) else 0,  # stop once every response has ended
    )

    def generate(params, prompt, prompt_mask, keys) -> Rollout:
        out = sample(params, prompt, prompt_mask, keys, model=model, settings=settings)
        return Rollout(prompt, prompt_mask, out["tokens"], out["mask"], out["ended"], out["logprobs"])

    return generate


def prompt_data(run: Run):
    """(tokenizer, prompt source, columns) of config.data.prompts_path (empty: built-in prompts written here);
    columns[i]: the fields of the source's record i other than its text, for the reward functions."""
    from rlhf_jax.data import chat, prompts
    from rlhf_jax.tasks import builtin_text

    c = run.config
    data_dir = os.path.join(run.workdir, "data")
    path, fmt = c.data.prompts_path, c.data.prompts_format
    if not path:
        path, fmt = os.path.join(data_dir, "builtin_prompts.jsonl"), "prompt"
        run.log(
            "config.data.prompts_path is empty: training on the built-in task's prompts (give your own JSONL "
            "of {'prompt': ...} records, with any other fields your reward functions read, as "
            "--config.data.prompts_path=...)"
        )
        if run.is_main:
            _write_builtin_prompts(path, data_dir, c.seed)
    corpus = os.path.join(data_dir, "builtin_corpus.txt")
    if not (c.data.tokenizer_path or c.init_from) and run.is_main:
        builtin_text.write_builtin_corpus(corpus, seed=c.seed)
    tok = run.tokenizer([corpus])
    source, stats = run.main_first(
        prompts.build_prompt_dataset,
        path,
        fmt,
        tok.path,
        c.data.max_prompt_len,
        data_dir,
        line_range=tuple(c.data.prompts_lines) or None,
        template=chat.config_template(c.data),
    )
    run.log(f"prompts {path}: {stats}")
    return tok, source, prompts.prompt_columns(path, fmt, tuple(c.data.prompts_lines) or None)


def _write_builtin_prompts(path: str, data_dir: str, seed: int):
    from rlhf_jax.tasks import builtin

    os.makedirs(data_dir, exist_ok=True)
    builtin.write_prompts(path, 512, seed=seed + 7, split="train")


def bucket_width(longest: int, limit: int, bucket: int, half_octaves: bool = False) -> int:
    """The padded length for a batch whose longest row is `longest`: the smallest bucket·2^k that holds it
    (16, 32, 64, ...), or with half_octaves the smallest of bucket·{1, 3/2, 2, 3, 4, 6, ...} (16, 24, 32, 48,
    ...), capped at `limit` (bucket 0: always `limit`). Few shapes, hence few compilations; half-octaves leave
    at most a third of a batch as padding past its longest row, not half (43 tokens run at 48, not 64), for twice
    the shapes. The pg stage compiles its programs per (prompt, response) width pair, so it keeps octaves; DPO's
    batches have one width and use half-octaves."""
    if bucket <= 0:
        return limit
    width, k = bucket, 0
    while width < longest:
        if half_octaves and width == bucket << k:  # bucket·2^k → bucket·2^k·3/2
            width = (3 * bucket << k) // 2
        else:  # → bucket·2^(k+1)
            k += 1
            width = bucket << k
    return min(width, limit)


def global_max(x: int) -> int:
    """The largest of every process's `x`."""
    if jax.process_count() == 1:
        return int(x)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(x, np.int32))))


def prompt_batch(loader, iteration: int, group: int, run: Run, bucket: int = 0):
    """This iteration's prompts, each `group` times in a row (the samples of one prompt), as global arrays,
    left-padded to bucket_width of the longest prompt in the batch (bucket 0: to data.max_prompt_len), with
    each row's record index (Rollout.prompt_index)."""
    local = loader.get_batch(iteration)
    tokens, mask = local["prompt_tokens"], local["prompt_mask"]
    width = bucket_width(global_max(mask.sum(1).max(initial=1)), tokens.shape[1], bucket)
    return parallel.global_batch(
        {
            "prompt": np.repeat(tokens[:, -width:], group, axis=0),
            "prompt_mask": np.repeat(mask[:, -width:], group, axis=0),
            "prompt_index": np.repeat(local["index"], group, axis=0),
        },
        run.mesh,
        run.rules,
    )


@functools.partial(jax.jit, static_argnums=1)
def _first_tokens(rollout: Rollout, width: int) -> Rollout:
    return rollout.replace(
        response=rollout.response[:, :width],
        response_mask=rollout.response_mask[:, :width],
        sampler_logprobs=rollout.sampler_logprobs[:, :width],
    )


def trim_responses(rollout: Rollout, bucket: int) -> Rollout:
    """A generated rollout cut to bucket_width of its longest response (bucket 0: unchanged): the score and
    update steps then spend nothing on the padding after the last sequence ended."""
    N = rollout.response.shape[1]
    width = bucket_width(int(parallel.to_host(rollout.response_mask.sum(1)).max(initial=1)), N, bucket)
    return rollout if width == N else _first_tokens(rollout, width)


def decode(tok, rollout: Rollout) -> tuple[list[str], list[str]]:
    """(prompts, responses) of every process's episodes, as text."""
    prompts, pmask = parallel.to_host(rollout.prompt), parallel.to_host(rollout.prompt_mask)
    resp, rmask = parallel.to_host(rollout.response), parallel.to_host(rollout.response_mask)
    p_text = [tok.decode_markup([int(t) for t, m in zip(row, mk) if m]) for row, mk in zip(prompts, pmask)]
    r_text = [tok.decode([int(t) for t, m in zip(row, mk) if m]) for row, mk in zip(resp, rmask)]
    return p_text, r_text


def sample_keys(seed: int, iteration: int, B: int, run: Run):
    """One PRNG key per episode (B per iteration), from (seed, global episode index): independent of
    batching and topology."""
    p, n = jax.process_index(), jax.process_count()
    idx = iteration * B + np.arange(p * B // n, (p + 1) * B // n)
    return parallel.global_batch({"k": example_keys(seed, idx)}, run.mesh, run.rules)["k"]


def joined(rollout: Rollout):
    """(tokens, mask) [B, P + N] of a rollout: prompt and response side by side."""
    return (
        jnp.concatenate([rollout.prompt, rollout.response], axis=1),
        jnp.concatenate([rollout.prompt_mask, rollout.response_mask], axis=1),
    )


def write_samples(path: str, writer, step: int, tok, rollout: Rollout, scores, run: Run, n: int = 8):
    p_text, r_text = decode(tok, rollout)
    rows = [
        {"step": step, "prompt": p, "response": r, "score": float(s)}
        for p, r, s in list(zip(p_text, r_text, np.asarray(scores)))[:n]
    ]
    if run.is_main:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        table = "| prompt | response | score |\n|---|---|---|\n" + "".join(
            f"| {r['prompt']!r} | {r['response']!r} | {r['score']:.3f} |\n" for r in rows
        )
        writer.write_text(step, "samples", table)
