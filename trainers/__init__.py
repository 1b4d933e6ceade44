"""Trainer workers: DeepSpeed policy, batch collation, the TrainerWorker actor."""
