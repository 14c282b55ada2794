"""Evaluation: held-out loss and zero-shot tasks, evaluation sets, the students' comparison report."""
