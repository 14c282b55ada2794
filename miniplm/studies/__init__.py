"""Studies on a finished run: the students over seeds, the paper's claims in miniature."""
