"""Rollout workers: the vLLM generation engine and the RolloutWorker actor."""
