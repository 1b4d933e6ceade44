"""DAPO's soft overlong punishment: a reward penalty that grows as a response nears the length limit.

A response cut at the limit gets the task reward of an unfinished answer, which punishes a
possibly sound line of reasoning only for its length, and noisily. DAPO instead adds a length
penalty that is 0 up to ``max_len - buffer`` tokens, falls linearly to ``-penalty`` at
``max_len``, and stays there beyond.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """``[B]`` float32 additive reward shaping for responses of ``lengths`` tokens.

    With ``free = max_len - buffer``: 0 for ``length <= free``,
    ``-penalty * (length - free) / buffer`` up to ``max_len``, and ``-penalty`` beyond.
    ``buffer = 0`` turns the shaping off (all zeros).
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"the overlong buffer must be in [0, max_len={max_len}], got {buffer}")
    lengths = lengths.to(torch.float32)
    if buffer == 0:
        return torch.zeros_like(lengths)
    over = (lengths - (max_len - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * over / buffer
