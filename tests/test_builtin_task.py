"""The built-in RLHF task: the gold judge scores against hand-written answers, labelers agree
with the gold order at the calibrated rate, writers are deterministic, evaluation prompts are
held out from everything trained on, and the corpus carries forbidden words and wrong examples."""

import json
import random
import re

import numpy as np
import pytest

from rlhf_jax.data import chat, tokenizer as tok_lib
from rlhf_jax.tasks import builtin, builtin_text, demonstrator, instructions, judge, labelers
from rlhf_jax.tasks.world import FORBIDDEN

# One hand-solved instance of every kind.
SOLVED = {
    "copy": ("copy: fox rain lamp", "fox rain lamp"),
    "reverse": ("reverse: fox rain lamp", "lamp rain fox"),
    "sort": ("sort: 12 3 7 10", "3 7 10 12"),
    "add": ("add: 12 30", "42"),
    "subtract": ("subtract: 30 12", "18"),
    "count": ("count: fox rain lamp sun", "4"),
    "first": ("first: fox rain lamp", "fox"),
    "last": ("last: fox rain lamp", "lamp"),
    "context": ("context: the cat is red. the dog is blue. question: what color is the dog?", "blue"),
}
MORE_SOLVED = [
    ("sort: fox apple moon", "apple fox moon"),
    ("add 3 4", "7"),
    ("context: Anna has 3 books. Ben has 5 books. question: how many books does Ben have?", "5"),
]


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return builtin_text.write_builtin_corpus(str(tmp_path_factory.mktemp("corpus") / "c.txt"), num_chars=40_000)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return tok_lib.train_tokenizer(corpus, str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=400)


# --- instructions and the gold judge ------------------------------------------------------------


def test_every_kind_is_covered_and_solved_as_written_by_hand():
    assert set(SOLVED) == set(instructions.KINDS)
    for instruction, answer in [*SOLVED.values(), *MORE_SOLVED]:
        assert instructions.solve_instruction(instruction) == answer
    rng, kinds = random.Random(0), set()
    for _ in range(300):
        instruction = instructions.sample_instruction(rng)
        kinds.add(instructions.kind_of(instruction))
        assert judge.gold_score(instruction, instructions.solve_instruction(instruction)) == 1.0
    assert kinds == set(instructions.KINDS)
    short = {instructions.kind_of(instructions.sample_instruction(rng, kinds=("add", "copy"))) for _ in range(50)}
    assert short == {"add", "copy"}
    with pytest.raises(ValueError, match="subset of"):
        instructions.sample_instruction(rng, kinds=("add", "shout"))


@pytest.mark.parametrize("kind", sorted(SOLVED))
def test_correct_answers_score_one_in_any_surface_form(kind):
    instruction, answer = SOLVED[kind]
    for response in [
        answer,
        f"  {answer}\n",
        answer.upper(),
        f"{answer}.",
        f"{answer}<|end|>",
        f"{answer}<|end|><|user|>more text",
        answer.replace(" ", ", "),
    ]:
        assert judge.gold_score(instruction, response) == 1.0, response
        assert judge.is_correct(instruction, response) and not judge.is_harmful(response)


def test_partial_credit_falls_with_each_word_error():
    instruction = "copy: fox rain lamp sun"
    # 0..4 word edits from the answer; credit = 1 - edits / max(len(response), len(answer)).
    responses = ["fox rain lamp sun", "fox rain lamp", "fox lamp rain sun", "fox moon", "milk"]
    scores = [judge.gold_score(instruction, r) for r in responses]
    assert scores == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert judge.gold_score(instruction, "fox rain lamp sun sun") == pytest.approx(0.8)
    assert judge.gold_score("add: 12 30", "42 42") == 0.5
    assert judge.gold_score("add: 12 30", "41") == 0.0  # words, not characters: a wrong number is wrong
    for garbage in ["", "<|end|>", "the the the the the the the the", "xq zz"]:
        assert judge.gold_score(instruction, garbage) <= 0.15
        assert not judge.is_correct(instruction, garbage)


def test_word_edit_distance_matches_hand_counts():
    d = judge.word_edit_distance
    assert d([], []) == 0 and d(["a"], []) == 1 and d([], ["a", "b"]) == 2
    assert d("the cat sat".split(), "the cat sat".split()) == 0
    assert d("a b c d".split(), "a x c".split()) == 2  # substitute b, delete d
    assert d("a b c".split(), "b c a".split()) == 2 == d("b c a".split(), "a b c".split())


def test_forbidden_words_are_flagged_and_penalised():
    instruction = "sort: 9 2 5"
    harmful = "2 5 Zorp, 9"
    assert judge.is_harmful(harmful) and not judge.is_correct(instruction, harmful)
    assert judge.credit(instruction, harmful) == 0.75
    assert judge.gold_score(instruction, harmful) == 0.75 - judge.HARM_PENALTY
    assert judge.gold_score(instruction, "blight") == 0.0  # clipped at 0
    assert not judge.is_harmful("2 5 9<|end|>zorp")  # after the turn ends: not part of the response
    assert not judge.is_harmful("zorpy vexing")  # whole words only
    # A harmful near-miss loses to a benign half-right answer.
    assert judge.gold_score(instruction, "2 5 9 zorp") < judge.gold_score(instruction, "2 9")
    for word in FORBIDDEN:
        assert judge.is_harmful(f"it is {word}.")
        assert not any(word in judge.normalise(a) for _, a in SOLVED.values())


def test_unknown_and_malformed_instructions_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown built-in instruction kind 'shout'"):
        instructions.solve_instruction("shout: a b")
    with pytest.raises(ValueError, match="states nothing about 'cat'"):
        instructions.solve_instruction("context: the dog is red. question: what color is the cat?")
    with pytest.raises(ValueError, match="non-negative integers"):
        instructions.solve_instruction("add: two 3")
    with pytest.raises(ValueError, match="no <\\|user\\|> turn"):
        instructions.parse_instruction("<|system|>be nice<|end|><|assistant|>")


def test_instruction_and_score_from_a_chat_prompt_decoded_by_a_real_tokenizer(tok):
    instruction, answer = SOLVED["context"]
    for messages in [
        instructions.prompt_messages(instruction),
        instructions.prompt_messages(instruction, True),
        [
            {"role": "user", "content": "copy: a"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": instruction},
        ],
    ]:
        prompt = tok.decode(chat.render_prompt(messages, tok))
        assert prompt.endswith("<|user|>" + instruction + "<|end|><|assistant|>")
        assert instructions.parse_instruction(prompt) == instruction
        hh = tok.decode(chat.render_prompt(messages, tok, template=chat.HH))  # the HH template's turns
        assert instructions.parse_instruction(hh) == instruction, hh
        response = tok.decode(tok.encode(answer) + [tok.role_ids["end"], tok.eos_id])
        assert response == answer + "<|end|>"
        assert judge.gold_score(prompt, response) == 1.0
        assert judge.gold_score(prompt, tok.decode(tok.encode("blue zorp"))) == 0.0
    rewards = builtin.gold_reward([prompt, prompt], [response, "red"], np.zeros((2, 3)), np.ones((2, 3)))
    assert rewards.dtype == np.float32 and rewards.tolist() == [1.0, 0.0]


# --- simulated labelers --------------------------------------------------------------------------


def _sft_like(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        instruction = instructions.sample_instruction(rng)
        responses = demonstrator.sft_like_responses(instruction, 4, rng)
        out.append((instruction, responses, [judge.gold_score(instruction, r) for r in responses]))
    return out


def _agreement(data, noise, seed):
    rng, agree, compared = np.random.default_rng(seed), 0, 0
    for instruction, responses, scores in data:
        ranking = labelers.rank_responses(instruction, responses, rng, noise)
        assert sorted(ranking) == list(range(len(responses)))
        a, c = labelers.pairwise_agreement(scores, ranking)
        agree, compared = agree + a, compared + c
    return agree / compared, compared


def test_labelers_agree_with_gold_about_three_quarters_of_the_time():
    data = _sft_like(600, seed=5)
    rate, compared = _agreement(data, labelers.DEFAULT_NOISE, seed=0)
    assert compared > 2000  # SFT-like samples do differ in quality
    assert abs(rate - 0.75) < 0.05, rate  # InstructGPT's inter-labeler agreement is ~0.73
    assert _agreement(data, 0.0, seed=0)[0] == 1.0
    assert _agreement(data, 0.3, seed=0)[0] > rate + 0.05  # less noise, more agreement
    assert labelers.pairwise_agreement([1.0, 0.5, 0.5, 0.0], [3, 1, 2, 0]) == (0, 5)


def test_online_labeler_scores_are_gold_plus_the_labelers_noise_and_repeatable():
    # The scores online DPO ranks by when config.reward.function is builtin:labeler_scores.
    data = _sft_like(300, seed=6)
    prompts = [p for p, rs, _ in data for _ in rs]
    responses = [r for _, rs, _ in data for r in rs]
    noisy = builtin.labeler_scores(prompts, responses, None, None)
    gold = builtin.gold_reward(prompts, responses, None, None)
    noise = noisy - gold
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - labelers.DEFAULT_NOISE) < 0.05
    np.testing.assert_array_equal(noisy, builtin.labeler_scores(prompts, responses, None, None))  # a rerun agrees
    # ranking each prompt's samples by these scores agrees with gold as often as the offline labelers do
    agree = compared = start = 0
    for _, rs, _ in data:
        s = noisy[start : start + len(rs)]
        g = gold[start : start + len(rs)]
        a, c = labelers.pairwise_agreement(list(g), [int(j) for j in np.argsort(-s, kind="stable")])
        agree, compared, start = agree + a, compared + c, start + len(rs)
    assert abs(agree / compared - 0.75) < 0.06


def test_rankings_are_deterministic_given_the_rng():
    responses = ["2 5 9", "2 9", "9 5 2", "zorp", "2 5 9 9"]
    a = [labelers.rank_responses("sort: 9 2 5", responses, np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    assert labelers.rank_responses("sort: 9 2 5", responses, np.random.default_rng(3), noise=0.0) == [0, 4, 1, 2, 3]


def test_write_comparisons_writes_ranked_records(tmp_path, tok):
    prompts = [tok.decode(chat.render_prompt(instructions.prompt_messages(i), tok)) for i, _ in SOLVED.values()]
    samples = [[a + "<|end|>", a + " " + a, "zorp"] for _, a in SOLVED.values()]
    path = labelers.write_comparisons(str(tmp_path / "a.jsonl"), prompts, samples, seed=1, noise=0.0)
    records = _jsonl(path)
    for rec, (instruction, answer) in zip(records, SOLVED.values()):
        assert rec == {"prompt": instruction, "responses": [answer, f"{answer} {answer}", "zorp"], "ranking": [0, 1, 2]}
        assert chat.record_to_messages({"prompt": rec["prompt"], "response": rec["responses"][0]})
    kept = _jsonl(
        labelers.write_comparisons(str(tmp_path / "e.jsonl"), prompts[:2], [["<|end|>", "x", " y "], ["", "x<|end|>"]])
    )
    assert [r["responses"] for r in kept] == [["x", "y"]]  # empty responses (and prompts left with one) dropped
    noisy = [labelers.write_comparisons(str(tmp_path / f"{n}.jsonl"), prompts, samples, seed=2) for n in "bc"]
    assert open(noisy[0]).read() == open(noisy[1]).read()
    with pytest.raises(ValueError, match="one list of responses per prompt"):
        labelers.write_comparisons(str(tmp_path / "x.jsonl"), prompts, samples[:-1])
    with pytest.raises(ValueError, match="K >= 2"):
        labelers.write_comparisons(str(tmp_path / "x.jsonl"), prompts[:1], [["one"]])


# --- writers: determinism, held-out evaluation, noisy demonstrations, the corpus ------------------


def test_writers_are_deterministic_by_seed(tmp_path):
    for name, write in [
        ("prompts", lambda p, s: builtin.write_prompts(p, 50, s)),
        ("demos", lambda p, s: builtin.write_demonstrations(p, 50, s)),
        ("corpus", lambda p, s: builtin.write_builtin_corpus(p, 3000, s)),
    ]:
        a, b, c = (open(write(str(tmp_path / f"{name}{i}"), s)).read() for i, s in enumerate([4, 4, 5]))
        assert a == b and a != c, name


def test_eval_prompts_are_held_out_from_all_training_data(tmp_path, corpus):
    train = [r["messages"] for r in _jsonl(builtin.write_prompts(str(tmp_path / "t.jsonl"), 400, seed=0))]
    evals = [r["messages"] for r in _jsonl(builtin.write_prompts(str(tmp_path / "e.jsonl"), 400, seed=0, split="eval"))]
    for messages in train + evals:
        assert [m["role"] for m in messages] == ["user"]  # no system turn, no assistant turn
    train_set, eval_set = {m[0]["content"] for m in train}, {m[0]["content"] for m in evals}
    assert len(train_set) == len(eval_set) == 400  # distinct within a file
    assert not train_set & eval_set
    assert {instructions.split_of(i) for i in eval_set} == {"eval"}
    demos = builtin.write_demonstrations(str(tmp_path / "d.jsonl"), 500, seed=0)
    demo_set = {m["content"] for r in _jsonl(demos) for m in chat.record_to_messages(r) if m["role"] == "user"}
    assert not demo_set & eval_set
    text = open(corpus).read()
    assert not [i for i in eval_set if f"{i} Answer:" in text or f"{i} and the answer" in text]
    assert [i for i in train_set if f"{i} Answer:" in text or f"{i} and the answer" in text]  # the check can fire


def test_demonstrator_errs_at_the_error_rate(tmp_path):
    turns = []
    for rec in _jsonl(builtin.write_demonstrations(str(tmp_path / "d.jsonl"), 1500, seed=1, error_rate=0.2)):
        messages = chat.record_to_messages(rec)
        turns += [(u["content"], a["content"]) for u, a in zip(messages, messages[1:]) if u["role"] == "user"]
    wrong = [(i, r) for i, r in turns if not judge.is_correct(i, r)]
    assert abs(len(wrong) / len(turns) - 0.2) < 0.03
    assert any(judge.is_harmful(r) for _, r in wrong) and all(judge.gold_score(i, r) < 1 for i, r in wrong)
    rng = random.Random(0)
    for _, answer in [*SOLVED.values(), ("copy: a a", "a a")] * 30:
        assert demonstrator.corrupt(answer, rng) != answer


def test_chatter_ends_a_share_of_demonstrations_and_the_judge_counts_it_as_extra_words(tmp_path):
    def demos(chatter_rate):
        path = builtin.write_demonstrations(
            str(tmp_path / f"c{chatter_rate}.jsonl"), 1500, seed=2, error_rate=0.2, chatter_rate=chatter_rate
        )
        return open(path).read()

    assert (
        demos(0.0)
        == open(builtin.write_demonstrations(str(tmp_path / "plain.jsonl"), 1500, seed=2, error_rate=0.2)).read()
    )  # rate 0: bytes as before
    turns = []
    for line in demos(0.4).splitlines():
        messages = chat.record_to_messages(json.loads(line))
        turns += [(u["content"], a["content"]) for u, a in zip(messages, messages[1:]) if u["role"] == "user"]
    chatty = [(i, r) for i, r in turns if r.endswith(demonstrator.CHATTER)]
    assert abs(len(chatty) / len(turns) - 0.4) < 0.04
    # chatter is independent of slips: about 80% of the chatty answers are right once the remark is cut
    cut = [
        (i, r.rsplit(" ", len(next(c for c in demonstrator.CHATTER if r.endswith(" " + c)).split()))[0])
        for i, r in chatty
    ]
    assert abs(sum(judge.is_correct(i, a) for i, a in cut) / len(cut) - 0.8) < 0.05
    # by hand: "42 is the answer" has 3 extra words over the 1-word answer -> 1 - 3/4
    assert judge.gold_score("add: 12 30", "42 is the answer") == 0.25
    assert judge.gold_score("reverse: a b c", "c b a i see it") == 1 - 3 / 6
    assert not judge.is_correct("add: 12 30", "42 yes it is")
    with pytest.raises(ValueError, match="chatter_rate=1.5"):
        demonstrator.demonstrate("add: 1 2", random.Random(0), chatter_rate=1.5)


def _worked_examples(text):
    """(instruction, answer) of the "Task: ... Answer: ..." examples in a corpus."""
    return re.findall(r"Task: (.+?) Answer: ([^.\n]*)\.", text)


def test_corpus_has_forbidden_words_and_some_wrong_worked_examples(corpus, tmp_path):
    text = open(corpus).read()
    words = set(re.findall(r"[a-z]+", text))
    assert set(FORBIDDEN) <= words
    examples = [(i, a) for i, a in _worked_examples(text) if not judge.is_harmful(i + " " + a)]
    assert len(examples) > 100
    wrong = [(i, a) for i, a in examples if instructions.solve_instruction(i) != a]
    assert 0.08 < len(wrong) / len(examples) < 0.3  # DEFAULT_WRONG_RATE = 0.2, less the forbidden insertions
    clean = open(
        builtin_text.write_builtin_corpus(
            str(tmp_path / "clean.txt"), 40_000, seed=0, wrong_rate=0.0, forbidden_rate=0.0
        )
    ).read()
    assert not set(FORBIDDEN) & set(re.findall(r"[a-z]+", clean))
    assert all(instructions.solve_instruction(i) == a for i, a in _worked_examples(clean))


# --- evaluation ------------------------------------------------------------------------------------


def test_evaluate_responses_and_win_rate_by_hand():
    prompts = ["add: 1 2", "first: a b", "count: a b", "last: a b"]
    a = ["3", "a zorp", "2", "a"]
    b = ["3", "b", "2 2", "b"]
    assert builtin.evaluate_responses(prompts, a) == {
        "gold_score": 0.5,
        "correct_rate": 0.5,
        "harmful_rate": 0.25,
        "chatter_rate": 0.0,
        "answer_correct_rate": 0.5,
    }
    chatty = builtin.evaluate_responses(prompts, ["3 is the answer", "a", "3 i see it<|end|>", "yes it is"])
    # a bare remark is no answer followed by chatter; "3 i see it" is a wrong count with a remark
    assert (chatty["chatter_rate"], chatty["correct_rate"], chatty["answer_correct_rate"]) == (0.5, 0.25, 0.5)
    # A vs B: tie (1 vs 1), tie (0 vs 0), win (1 vs 0.5), loss (0 vs 1).
    assert builtin.win_rate(prompts, a, b) == (0.5 + 0.5 + 1 + 0) / 4
    assert builtin.win_rate(prompts, a, b) + builtin.win_rate(prompts, b, a) == 1.0
    assert builtin.win_rate(prompts, a, a) == 0.5
    with pytest.raises(ValueError, match="one response from each policy"):
        builtin.win_rate(prompts, a, b[:2])


def test_the_demonstrators_forbidden_share_sets_how_many_demonstrations_are_harmful(tmp_path):
    def harmful_share(forbidden_prob):
        path = builtin.write_demonstrations(
            str(tmp_path / f"d{forbidden_prob}.jsonl"), 1500, seed=3, error_rate=0.2, forbidden_prob=forbidden_prob
        )
        responses = []
        for line in open(path):
            r = json.loads(line)
            responses += (
                [r["response"]]
                if "response" in r
                else [m["content"] for m in r["messages"] if m["role"] == "assistant"]
            )
        return sum(map(builtin.is_harmful, responses)) / len(responses)

    assert harmful_share(0.0) == 0.0
    assert 0.08 < harmful_share(0.5) < 0.12  # error_rate 0.2 × 0.5
    assert 0.17 < harmful_share(1.0) < 0.23


def test_few_shot_prompts_prepend_solved_training_instances_of_the_same_kind_and_never_an_evaluation_one(tmp_path):
    src = builtin.write_prompts(str(tmp_path / "eval.jsonl"), 60, seed=3, split="eval")
    dst = builtin.write_few_shot_prompts(src, str(tmp_path / "few.jsonl"), k=3, seed=1)
    held_out = {r["messages"][-1]["content"] for r in _jsonl(src)}
    kinds = set()
    for orig, few in zip(_jsonl(src), _jsonl(dst), strict=True):
        orig, few = orig["messages"], few["messages"]
        shots = few[: -len(orig)]
        assert few[-len(orig) :] == orig and [m["role"] for m in shots] == ["user", "assistant"] * 3
        instruction = orig[-1]["content"]
        kinds.add(instructions.kind_of(instruction))
        for question, answer in zip(shots[::2], shots[1::2]):
            q = question["content"]
            assert instructions.split_of(q) == "train" and q not in held_out  # no evaluation instance, anywhere
            assert instructions.kind_of(q) == instructions.kind_of(instruction)
            assert builtin.gold_score(q, answer["content"]) == 1.0  # solved correctly
        assert len({m["content"] for m in shots[::2]}) == 3
    assert len(kinds) >= 5
    assert (
        builtin.write_few_shot_prompts(src, str(tmp_path / "again.jsonl"), k=3, seed=1)
        and (tmp_path / "again.jsonl").read_text() == (tmp_path / "few.jsonl").read_text()
    )
