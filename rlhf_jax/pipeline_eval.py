"""The pipeline's evaluation and report: SFT vs the policy stage's policy (PPO or another algorithm,
config.policy) on held-out prompts, judged by the gold judge."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import algorithms, forward, parallel
from rlhf_jax.data import chat
from rlhf_jax.trained import generate, load_policy, load_reward_model, response_logprobs, sampling_settings


def eval_prompts(c, paths: dict, tok, stage_dir: str):
    """The held-out prompts as a prompt source, rendered in the task's chat format (built under stage_dir)."""
    from rlhf_jax.data import prompts as prompt_data

    source, _ = prompt_data.build_prompt_dataset(
        paths["eval_prompts"],
        "prompt",
        tok.path,
        c.data.max_prompt_len,
        os.path.join(stage_dir, "tfds"),
        template=chat.config_template(c.data),
    )
    return source


def alignment_tax(c, paths: dict, tok, stage_dir: str, mesh, rules):
    """(model, params) -> {"pretrain_loss": ...} on the pretraining corpus' held-out windows (InstructGPT
    §4.2's alignment tax), or -> {} for a model that came pretrained (no corpus to hold out)."""
    if "corpus" not in paths:
        return lambda model, params: {}
    heldout = pretrain_heldout(c, paths, tok, stage_dir)
    return lambda model, params: {"pretrain_loss": lm_loss(model, params, heldout, mesh, rules, c.eval.batch_size)}


def evaluate_baselines(c, sub: dict, paths: dict, rm_metrics: dict, mesh, rules) -> dict:
    """The rows every policy trained from one SFT policy and RM shares: the pretrained model prompted zero- and
    few-shot, SFT, best-of-n SFT samples by the RM, and the RM's accuracy against the gold judge. Written to
    sub["baselines"] (responses in its responses.json), so that the policies of one seed (config.reuse_from)
    decode and judge them once. Every row decodes the held-out prompts with the evaluation's settings and keys."""
    from rlhf_jax.tasks import builtin

    out = sub["baselines"]
    sft_model, sft_params, tok = load_policy(sub["sft"], mesh, rules)
    source = eval_prompts(c, paths, tok, out)
    settings = sampling_settings(tok, c.eval.max_new_tokens, c.eval.temperature, chat.config_template(c.data))
    sft = generate(
        sft_model, sft_params, tok, source, settings, mesh, rules, seed=c.seed + 100, batch_size=c.eval.batch_size
    )
    prompts = sft["prompts"]
    # Best-of-n against the RM: n SFT samples per prompt, keep the one the RM scores highest.
    cands, rm_scores = sft_samples_scored_by_rm(
        c, sub, sft_model, sft_params, tok, source, c.eval.best_of_n, mesh, rules, first=sft
    )
    best = np.argmax(rm_scores, axis=0)
    bon = [cands[b][i] for i, b in enumerate(best)]
    tax = alignment_tax(c, paths, tok, out, mesh, rules)
    base_model, base_params, _ = load_policy(sub["pretrain"], mesh, rules)
    pretrained = {**({"path": c.pretrained} if c.pretrained else {}), **tax(base_model, base_params)}
    sft_eval = {**builtin.evaluate_responses(prompts, sft["responses"]), **tax(sft_model, sft_params)}
    prompted, prompted_responses = prompted_baselines(
        c,
        out,
        paths,
        base_model,
        base_params,
        tok,
        source,
        settings,
        prompts,
        sft["responses"],
        mesh,
        rules,
    )
    bon_key = f"best_of_{c.eval.best_of_n}_sft_by_rm"
    with open(os.path.join(out, "responses.json"), "w") as f:
        json.dump({"prompts": prompts, **prompted_responses, "sft": sft["responses"], bon_key: bon}, f)
    return {
        "pretrained": pretrained,
        **prompted,
        "sft": sft_eval,
        bon_key: {
            **builtin.evaluate_responses(prompts, bon),
            "win_rate_vs_sft": builtin.win_rate(prompts, bon, sft["responses"]),
        },
        "rm": {
            **rm_accuracy_vs_gold(sub, tok, c, mesh, rules),
            "accuracy_vs_gold_incl_ties": rm_metrics.get("eval/rm/accuracy"),
        },
    }


def evaluate(c, sub: dict, paths: dict, baselines: dict, mesh, rules) -> dict:
    """summary.json's content: the policy stage's policy on the held-out prompts, with the same settings and
    keys as the SFT sample it is compared with, beside the seed's baselines (evaluate_baselines)."""
    from rlhf_jax.tasks import builtin

    sft_model, sft_params, tok = load_policy(sub["sft"], mesh, rules)
    pol_model, pol_params, _ = load_policy(sub["policy"], mesh, rules)
    source = eval_prompts(c, paths, tok, sub["eval"])
    temp, bs = c.eval.temperature, c.eval.batch_size
    settings = sampling_settings(tok, c.eval.max_new_tokens, temp, chat.config_template(c.data))
    pol = generate(pol_model, pol_params, tok, source, settings, mesh, rules, seed=c.seed + 100, batch_size=bs)
    with open(os.path.join(sub["baselines"], "responses.json")) as f:
        shared = json.load(f)
    prompts, sft_responses = pol["prompts"], shared["sft"]
    if prompts != shared["prompts"]:
        raise RuntimeError(
            f"the held-out prompts of {paths['eval_prompts']} differ from those {sub['baselines']} was evaluated "
            f"on; delete {sub['eval']} and {sub['baselines']} and rerun."
        )
    # KL(policy ‖ SFT) per episode on the policy's own samples, at the decoding temperature (as objective/kl).
    kl_temp = temp if temp > 0 else 1.0  # greedy decoding: measure KL of the untempered policies
    lp_pol = response_logprobs(pol_model, pol_params, pol, kl_temp, mesh, rules, bs)
    lp_sft = response_logprobs(sft_model, sft_params, pol, kl_temp, mesh, rules, bs)
    pol_tax = alignment_tax(c, paths, tok, sub["eval"], mesh, rules)(pol_model, pol_params)
    # Every row's responses, so that runs can be judged against one another afterwards (e.g. every model size's
    # policies against the largest model's SFT: experiments/model_size.py).
    with open(os.path.join(sub["eval"], "responses.json"), "w") as f:
        json.dump({**shared, "policy": pol["responses"]}, f)
    samples = [
        {
            "prompt": p,
            "sft": a,
            "policy": b,
            "gold_sft": builtin.gold_score(p, a),
            "gold_policy": builtin.gold_score(p, b),
        }
        for p, a, b in list(zip(prompts, sft_responses, pol["responses"]))[:12]
    ]
    rows = {k: v for k, v in baselines.items() if k != "wall_s"}
    return {
        "decoding": {
            "temperature": temp,
            "max_new_tokens": c.eval.max_new_tokens,
            "prompts": len(prompts),
            "same_keys_for_both": True,
        },
        **rows,
        "policy": {
            **builtin.evaluate_responses(prompts, pol["responses"]),
            **pol_tax,
            "algorithm": c.policy,
            "kl": float(np.mean(lp_pol - lp_sft)),
            "wall_s": stage_wall_s(sub["policy"]),
            "win_rate_vs_sft": builtin.win_rate(prompts, pol["responses"], sft_responses),
        },
        "baselines_wall_s": baselines.get("wall_s"),
        "samples": samples,
    }


def prompted_baselines(
    c, out_dir: str, paths, model, params, tok, source, settings, prompts, sft_responses, mesh, rules
):
    """{"gpt_zero_shot": ..., "gpt_few_shot": ...}: the pretrained model, never fine-tuned, given the held-out
    instruction alone and after c.eval.few_shot solved training instances of its kind (GPT-3's prompting,
    InstructGPT Figure 1's "GPT" and "GPT (prompted)"), decoded and judged like SFT and the policy. The
    few-shot prompts may be up to (few_shot + 1) × data.max_prompt_len tokens, capped so that prompt and
    response fit the pretraining window (positions the model never trained on would say nothing about
    prompting); the longest lose their first examples, never the instruction."""
    from rlhf_jax.data import prompts as prompt_data
    from rlhf_jax.tasks import builtin

    k, P = c.eval.few_shot, c.data.max_prompt_len
    # a pretrained model's window is far longer than any few-shot prompt here
    window = (model.cfg.max_len if c.pretrained else c.pretrain.data.seq_len) - c.eval.max_new_tokens
    path = builtin.write_few_shot_prompts(
        paths["eval_prompts"], os.path.join(out_dir, f"eval_prompts_{k}shot.jsonl"), k, seed=c.seed + 7
    )
    few, _ = prompt_data.build_prompt_dataset(
        path,
        "prompt",
        tok.path,
        max(P, min((k + 1) * P, window)),
        os.path.join(out_dir, "tfds"),
        template=chat.config_template(c.data),
    )
    out, responses = {}, {}
    for name, src, shots in (("gpt_zero_shot", source, 0), ("gpt_few_shot", few, k)):
        g = generate(model, params, tok, src, settings, mesh, rules, seed=c.seed + 100, batch_size=c.eval.batch_size)
        if [builtin.parse_instruction(p) for p in g["prompts"]] != [builtin.parse_instruction(p) for p in prompts]:
            raise RuntimeError(
                f"the {shots}-shot prompts of {path} do not end with the held-out instructions of "
                f"{paths['eval_prompts']} in the same order; delete {out_dir} and rerun."
            )
        out[name] = {
            **builtin.evaluate_responses(prompts, g["responses"]),
            "shots": shots,
            "prompt_tokens_mean": float(np.mean(np.sum(g["prompt_mask"], 1))),
            "win_rate_vs_sft": builtin.win_rate(prompts, g["responses"], sft_responses),
        }
        responses[name] = g["responses"]
    return out, responses


def stage_wall_s(stage_dir: str) -> float | None:
    """The wall time a pipeline stage took (its DONE.json's "wall_s"; None for runs older than that record)."""
    with open(os.path.join(stage_dir, "DONE.json")) as f:
        return json.load(f).get("wall_s")


def sft_samples_scored_by_rm(c, sub: dict, model, params, tok, source, n: int, mesh, rules, first=None):
    """(responses [n][N], RM scores [n, N]) of n SFT samples per prompt of `source` at the evaluation
    settings; sample 0 is `first` when given (the evaluation's SFT sample), sample j's key seed + 200 + j."""
    rm_model, rm_params, norm = load_reward_model(sub["rm"], mesh, rules)
    score = jax.jit(lambda p, t, m: forward.score_sequences(p, rm_model, norm, t, m))
    settings, bs = (
        sampling_settings(tok, c.eval.max_new_tokens, c.eval.temperature, chat.config_template(c.data)),
        c.eval.batch_size,
    )
    cands, rm_scores = [], []
    with parallel.activate(mesh, rules):
        for j in range(n):
            s = (
                first
                if j == 0 and first is not None
                else generate(
                    model,
                    params,
                    tok,
                    source,
                    settings,
                    mesh,
                    rules,
                    seed=c.seed + (100 if j == 0 else 200 + j),
                    batch_size=bs,
                )
            )
            cands.append(s["responses"])
            t = np.concatenate([s["prompt"], s["response"]], 1)
            m = np.concatenate([s["prompt_mask"], s["response_mask"]], 1)
            rm_scores.append(
                np.concatenate(
                    [
                        np.asarray(
                            jax.device_get(score(rm_params, jnp.asarray(t[i : i + bs]), jnp.asarray(m[i : i + bs])))
                        )
                        for i in range(0, len(t), bs)
                    ]
                )
            )
    return cands, np.stack(rm_scores)


def best_of_n_curve(rm_scores, gold, ns) -> list[dict]:
    """Best-of-n by the RM and by the gold judge (the oracle), for each n in `ns`, from [N_max, P] score
    matrices of the same samples; sample 0 is the SFT baseline the win rates compare against (ties half).
    The RM's curve peaking while the oracle's rises is over-optimisation (Gao et al. 2022, best-of-n)."""
    rm_scores, gold = np.asarray(rm_scores, np.float64), np.asarray(gold, np.float64)
    if rm_scores.shape != gold.shape or max(ns) > len(gold) or min(ns) < 1:
        raise ValueError(
            f"best_of_n_curve: scores {rm_scores.shape} and gold {gold.shape} must match, with every "
            f"n in {tuple(ns)} between 1 and the {len(gold)} samples."
        )
    cols = np.arange(gold.shape[1])
    win = lambda g: float(np.mean((np.sign(g - gold[0]) + 1) / 2))
    out = []
    for n in ns:
        by_rm = gold[np.argmax(rm_scores[:n], axis=0), cols]
        oracle = gold[:n].max(axis=0)
        out.append(
            {
                "n": int(n),
                "gold_by_rm": float(by_rm.mean()),
                "win_by_rm": win(by_rm),
                "gold_oracle": float(oracle.mean()),
                "win_oracle": win(oracle),
            }
        )
    return out


def within_prompt_correlation(a, b) -> float:
    """Mean over prompts (columns of the [n, P] matrices) of the correlation across a prompt's samples;
    prompts where either is constant are left out (nan if all are). E.g. RM score against response
    length: an RM that prefers shorter answers whatever they say has a negative one."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = (a.std(axis=0) > 0) & (b.std(axis=0) > 0)
    if not keep.any():
        return float("nan")
    a, b = a[:, keep] - a[:, keep].mean(0), b[:, keep] - b[:, keep].mean(0)
    return float(np.mean((a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))))


def pretrain_heldout(c, paths: dict, tok, stage_dir: str):
    """The pretraining corpus' validation windows (never trained on, nor used by PPO-ptx), built under stage_dir."""
    from rlhf_jax.data import lm_datasets

    return lm_datasets.build_text_dataset(
        paths["corpus"],
        tok.path,
        c.pretrain.data.seq_len,
        os.path.join(stage_dir, "tfds"),
        val_fraction=c.pretrain.data.val_fraction,
    )["validation"]


def lm_loss(model, params, source, mesh, rules, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every window of `source`."""
    from rlhf_jax.data.loader import eval_batches

    fn = jax.jit(lambda p, b: forward.summed_token_nll(p, model, b))
    total = count = 0.0
    with parallel.activate(mesh, rules):
        for local in eval_batches(source, batch_size):
            s, n = fn(params, parallel.global_batch(local, mesh, rules))
            total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def rm_accuracy_vs_gold(sub: dict, tok, c, mesh, rules) -> dict:
    """RM pairwise accuracy on the held-out comparisons, against the gold judge, over pairs whose gold
    scores differ (a tie has no right answer; the RM stage's eval/rm/accuracy counts ties as labelled)."""
    from rlhf_jax.data.chat import prompt_response_to_messages, render_dialogue
    from rlhf_jax.tasks import builtin

    model, params, norm = load_reward_model(sub["rm"], mesh, rules)
    score = jax.jit(lambda p, t, m: forward.score_sequences(p, model, norm, t, m))
    right = total = 0
    with open(os.path.join(sub["comparisons"], "eval_gold.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with parallel.activate(mesh, rules):
        for r in records:
            ids = [
                render_dialogue(
                    prompt_response_to_messages(r["prompt"], x), tok, template=chat.config_template(c.data)
                )[0][-c.rm.data.seq_len :]
                for x in r["responses"]
            ]
            L = c.rm.data.seq_len  # one shape: one compilation
            t = np.zeros((len(ids), L), np.int32)
            m = np.zeros((len(ids), L), np.int32)
            for k, i in enumerate(ids):
                t[k, : len(i)], m[k, : len(i)] = i, 1
            rm = np.asarray(jax.device_get(score(params, jnp.asarray(t), jnp.asarray(m))))
            gold = [builtin.gold_score(r["prompt"], x) for x in r["responses"]]
            for a in range(len(gold)):
                for b in range(a + 1, len(gold)):
                    if gold[a] != gold[b]:
                        total += 1
                        right += (rm[a] > rm[b]) == (gold[a] > gold[b])
    return {"accuracy_vs_gold": right / max(total, 1), "gold_untied_pairs": total}


def write_report(c, workdir: str, sub: dict, summary: dict, seconds: float) -> None:
    from rlhf_jax.metrics import read_metrics

    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "samples"}, f, indent=2)
    name = algorithms.label(summary["policy"]["algorithm"])
    curve = [m for m in read_metrics(sub["policy"]) if "objective/scores" in m]
    plots = _plots(workdir, curve, name) if curve else []  # offline DPO samples nothing while it trains
    bon_key = next(k for k in summary if k.startswith("best_of_"))
    base = os.path.basename(os.path.normpath(c.pretrained)) if c.pretrained else "GPT"  # the prompted rows' model
    pol = summary["policy"]
    rows = (
        [
            (f"{base} zero-shot", summary["gpt_zero_shot"], f"{summary['gpt_zero_shot']['win_rate_vs_sft']:.3f}", "—"),
            (
                f"{base} {summary['gpt_few_shot']['shots']}-shot",
                summary["gpt_few_shot"],
                f"{summary['gpt_few_shot']['win_rate_vs_sft']:.3f}",
                "—",
            ),
        ]
        if "gpt_zero_shot" in summary
        else []
    )
    rows += [
        ("SFT", summary["sft"], "—", "—"),
        (name, pol, f"{pol['win_rate_vs_sft']:.3f}", f"{pol['kl']:.3f}"),
        (bon_key.replace("_", " "), summary[bon_key], f"{summary[bon_key]['win_rate_vs_sft']:.3f}", "—"),
    ]
    lines = [
        f"# RLHF on the built-in task ({c.preset} preset)",
        "",
        f"Held-out prompts: {summary['decoding']['prompts']}; decoding: temperature "
        f"{summary['decoding']['temperature']}, up to {summary['decoding']['max_new_tokens']} tokens, the same "
        f"PRNG key per prompt for every policy. Gold judge: 1 − word edit distance to the correct answer, "
        f"−0.5 if a forbidden word appears.",
        "",
        "| policy | gold score | exact-correct | harmful | chatter | win rate vs SFT | KL(·‖SFT) nats | "
        "pretraining loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {e['gold_score']:.3f} | {e['correct_rate']:.3f} | {e['harmful_rate']:.3f} | "
        f"{e['chatter_rate']:.3f} | {w} | {k} | " + (f"{e['pretrain_loss']:.3f} |" if "pretrain_loss" in e else "— |")
        for n, e, w, k in rows
    ]
    if "pretrain_loss" in summary["pretrained"]:
        lines += [
            "",
            "Pretraining loss: nats per token on the pretraining corpus' held-out windows (the alignment tax "
            f"is {name}'s rise over SFT's); the pretrained model's: {summary['pretrained']['pretrain_loss']:.3f}.",
        ]
    else:
        lines += ["", f"Pretrained model: {summary['pretrained']['path']} (no pretraining corpus held out here)."]
    lines += [
        "",
        f"Reward model accuracy against the gold judge on {summary['rm']['gold_untied_pairs']} held-out "
        f"pairs with different gold scores: {summary['rm']['accuracy_vs_gold']:.3f}",
        "",
        f"Wall time: {seconds / 60:.1f} min (this invocation).",
        "",
        "## Samples",
        "",
        f"| prompt | SFT | gold | {name} | gold |",
        "|---|---|---|---|---|",
    ]
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
    lines += [
        f"| {esc(s['prompt'])} | {esc(s['sft'])} | {s['gold_sft']:.2f} | {esc(s['policy'])} | {s['gold_policy']:.2f} |"
        for s in summary["samples"]
    ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _plots(workdir: str, curve: list[dict], name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in curve]
    out = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [m["objective/scores"] for m in curve], label="RM score (normalised)")
    if "objective/monitor_score" in curve[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [m["objective/monitor_score"] for m in curve], color="C1", label="gold score")
        ax2.set_ylabel("gold score")
        ax2.legend(loc="lower right")
    ax.set_xlabel(f"{name} iteration")
    ax.set_ylabel("RM score")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "scores_vs_step.png"), dpi=100)
    out.append("scores_vs_step.png")
    if "objective/monitor_score" in curve[0] and "objective/kl" in curve[0]:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([m["objective/kl"] for m in curve], [m["objective/monitor_score"] for m in curve], c=steps, s=12)
        ax.set_xlabel("KL(π ‖ SFT) per episode, nats")
        ax.set_ylabel("gold score of rollouts")
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "gold_vs_kl.png"), dpi=100)
        out.append("gold_vs_kl.png")
    plt.close("all")
    return out
