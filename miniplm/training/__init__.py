"""Training: the config, the objective (LM loss, online KD, FLOPs), the loop every Ray Train worker runs, the stage."""
