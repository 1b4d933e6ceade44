"""The run-pair ratios the rollout and train benches print before their last line."""

import pytest

from asyncrl.bench.pairs import pair_ratios, pairs_line


def test_each_pair_is_ours_over_the_baseline_run_beside_it():
    assert pair_ratios([90.0, 50.0, 120.0], [100.0, 50.0, 100.0]) == pytest.approx([0.9, 1.0, 1.2])


def test_the_line_gives_the_median_and_the_range():
    line = pairs_line([90.0, 50.0, 120.0], [100.0, 50.0, 100.0])
    assert "median 1.00" in line and "range 0.90-1.20" in line and "3 pairs" in line


@pytest.mark.parametrize(("ours", "bare"), [([], []), ([1.0], [1.0, 2.0])])
def test_unpaired_runs_are_refused(ours, bare):
    with pytest.raises(ValueError, match="as many runs"):
        pair_ratios(ours, bare)
