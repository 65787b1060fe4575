"""Training: the trainers (pre-training, meta-training, its hard-task meta-batch) on a shared run skeleton and its checkpoints."""
