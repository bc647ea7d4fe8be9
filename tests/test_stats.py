"""Interval statistics of `pkt report`, against hand computations."""

from __future__ import annotations

import math

import pytest

from pkt_pipeline.evaluation.stats import mean_half_width, paired_change_interval, paired_difference, score_half_width


def test_score_half_width_is_the_normal_approximation():
    assert score_half_width(0.4, 100) == pytest.approx(1.959964 * math.sqrt(0.4 * 0.6 / 100))
    assert score_half_width(0.5, 0) is None


def test_mean_half_width_uses_the_sample_deviation():
    # mean 2, sample variance ((1 + 0 + 1) / 2) = 1
    assert mean_half_width([1.0, 2.0, 3.0]) == pytest.approx(1.959964 / math.sqrt(3))
    assert mean_half_width([1.0]) is None


def test_paired_difference_pairs_by_item_id():
    model = {"a": 1.0, "b": 1.0, "c": 0.0, "only-model": 1.0}
    reference = {"a": 0.0, "b": 1.0, "c": 0.0, "only-reference": 0.0}
    difference = paired_difference(model, reference)
    half = 1.959964 * math.sqrt(1 / 3) / math.sqrt(3)  # differences 1, 0, 0: mean 1/3, sample variance 1/3
    assert difference["interval_95"] == pytest.approx([1 / 3 - half, 1 / 3 + half])
    assert {k: difference[k] for k in ("mean", "half_width_95", "n")} == pytest.approx(
        {"mean": 1 / 3, "half_width_95": half, "n": 3})
    assert paired_change_interval(model, reference) == pytest.approx((1 / 3 - half, 1 / 3 + half))
    assert paired_difference({"a": 1.0}, {"a": 0.0}) is None
    assert paired_change_interval({"a": 1.0}, {"b": 0.0}) is None
