"""Run-pair ratios of an alternating bench: each timed run of ours against the baseline run just before it.

The machine's speed drifts while a bench runs (other tenants, clocks); a pair shares most of that drift, so the
spread of the pair ratios says how far one command's ratio of medians can be trusted.
"""

from __future__ import annotations

import statistics


def pair_ratios(ours: list[float], bare: list[float]) -> list[float]:
    """``ours[i] / bare[i]`` for each run pair (throughputs, in run order)."""
    if len(ours) != len(bare) or not ours:
        raise ValueError(f"pair_ratios needs as many runs of each side, at least one: {len(ours)} and {len(bare)}")
    return [mine / theirs for mine, theirs in zip(ours, bare, strict=True)]


def pairs_line(ours: list[float], bare: list[float]) -> str:
    """One line: the median pair ratio and its range."""
    ratios = pair_ratios(ours, bare)
    return (
        f"run pairs (ours/baseline, each pair back to back): median {statistics.median(ratios):.2f}, "
        f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pairs"
    )
