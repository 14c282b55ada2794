"""The demo: the built-in sample corpus and the built-in teacher (and how it was built)."""
