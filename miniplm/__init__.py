"""MiniPLM on Ray: score a corpus with a teacher and a reference LM, keep what the
teacher knows better (Difference Sampling), pre-train students on it."""

__version__ = "0.1.0"
