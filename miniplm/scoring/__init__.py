"""Scoring: a causal LM's log-likelihood of every instance (the maths, and the Ray Data stage)."""
