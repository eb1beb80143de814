"""The built-in RLHF task: instructions with checkable answers, a gold judge, simulated labelers.

- `world`: the shared vocabulary (names, nouns, colours) and the FORBIDDEN words.
- `instructions`: instruction kinds, sampling (train/eval split), the solver, prompt parsing.
- `judge`: the gold score (word edit distance to the answer, harm penalty).
- `demonstrator`: the noisy demonstrator that writes SFT responses.
- `labelers`: simulated labelers that rank K responses with calibrated noise.
- `builtin_text`: the corpus (pretraining) and demonstrations (SFT) of the tiny presets and tests.
- `builtin`: the public surface: writers for demonstrations and prompts, the PPO reward
  adapter `rlhf_jax.tasks.builtin:gold_reward`, evaluation and win rate.

Nothing here imports JAX; everything is deterministic given a seed. The task reads `rlhf_jax.data`'s
role markers; `data/` never imports the task.
"""
