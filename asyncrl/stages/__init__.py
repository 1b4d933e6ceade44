"""Pipeline stages between the rollout workers and the trainer, each its own consumer of the store (DESIGN §6).

With ``stages.reward`` and/or ``stages.reference`` the rollout workers put their groups on the ``generated``
stream instead of ``trajectories``. Each stage is a consumer group of that stream run by a ``StageWorker``
actor: the reward stage (``reward``) scores the responses, the reference stage (``reference``) adds the frozen
initial model's log-probs. Both read only the columns they need, run side by side on the same entries, and add
their columns with ``TrajectoryStore.advance``, which hands an entry on to ``trajectories`` once every stage's
columns are there. So scoring and reference log-probs overlap generation, each other and training.
"""

# The stages themselves (asyncrl.stages.reward, asyncrl.stages.reference) import torch and transformers: only
# the workers that run them import those modules.
from asyncrl.stages.worker import StageSet, StageWorker, stage_names

__all__ = ["StageSet", "StageWorker", "stage_names"]
