"""Training: the shared linear base learner, checkpoints, pre-training and meta-training."""
