"""The benchmarks stay runnable: bench_sweep's sweep and legacy-style loop agree on tiny models."""

import bench_sweep
import pytest


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi"])  # plain, softcap, lm_head bias
def test_bench_model_reports_ratios_and_the_loop_agrees(tiny_dirs, family):
    row = bench_sweep.bench_model(family, tiny_dirs[family], runs=1)  # asserts agreement first
    assert set(row) == {"model", "floor_s", "sweep_s", "loop_s", "sweep_over_floor",
                        "loop_over_sweep", "peak_rss_mb"}
    assert all(row[key] > 0 for key in set(row) - {"model"})


def test_the_agreement_check_catches_a_wrong_probability():
    ours = {"entropy": 1.0, "top1": "a", "prob1": 0.5}
    theirs = {"entropy": 1.0, "ids": [3], "probs": [0.4], "texts": ["a"]}
    with pytest.raises(AssertionError):
        bench_sweep._check_agreement([ours], [], [theirs], [])


def test_tied_tokens_may_swap_but_untied_ones_may_not():
    same = bench_sweep._same_tokens_up_to_ties
    assert same(["a", "b", "c"], ["a", "b", "c"], [0.5, 0.3, 0.2])
    assert not same(["a", "c", "b"], ["a", "b", "c"], [0.5, 0.3, 0.2])
    assert same(["b", "a", "c"], ["a", "b", "c"], [0.4, 0.4, 0.2])  # a softcap saturated
    assert same(["a", "x", "y"], ["a", "b", "c"], [0.5, 0.1, 0.1])  # the tie at the cut-off
    assert not same(["z", "a", "b"], ["a", "b", "c"], [0.5, 0.1, 0.1])


def test_bench_next_token_runs_and_reports_the_side_by_side(tiny_dirs):
    row = bench_sweep.bench_next_token(tiny_dirs["llama"], runs=1)
    assert set(row) >= {"tl_last_s", "tl_last_checks_s", "no_records_s", "no_records_over_tl_checks"}
    assert all(row[key] > 0 for key in ("tl_all_s", "tl_last_s", "sweep_s", "no_records_s"))
