"""rlhf_jax: the InstructGPT / ChatGPT recipe in JAX. Importing has no side effects."""
