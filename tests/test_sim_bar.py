"""The SpotHedge bar: availability at least SpotHedge's, cost at most halfway to the optimum."""

from __future__ import annotations

import pytest

from skyhedge.simulator.bar import annotate, judge


def row(policy: str, availability: float | None, cost: float | None, trace: str = "t") -> dict:
    return {"trace": trace, "policy": policy, "availability": availability, "relative_cost": cost}


REFS = [row("spothedge", 0.99, 0.50), row("optimal", 1.0, 0.40)]


def test_cost_limit_is_halfway_between_spothedge_and_the_optimum():
    verdict = judge([*REFS, row("skyhedge", 0.99, 0.45)])[("t", "skyhedge")]
    assert verdict.cost_limit == pytest.approx(0.45)
    assert verdict.availability_floor == 0.99
    assert verdict.met and verdict.describe() == "met"  # both bounds are inclusive


def test_the_printed_limit_is_the_one_judged():
    """Two 6-decimal costs have a 7-decimal midpoint; printed rounded to 6 decimals, a cost equal
    to the limit shown was judged over it (found by an audit). It is printed whole."""
    refs = [row("spothedge", 0.99, 0.500001), row("optimal", 1.0, 0.400000)]
    over = judge([*refs, row("skyhedge", 0.99, 0.450001)])[("t", "skyhedge")].to_json()
    assert over["cost_limit"] == 0.4500005 and over["cost_margin"] == -0.0000005
    assert over["cost_ok"] is False and float(over["cost_limit"]) < 0.450001


@pytest.mark.parametrize(
    ("availability", "cost", "availability_ok", "cost_ok", "text"),
    [
        (0.9995, 0.44, True, True, "met"),
        (0.9895, 0.44, False, True, "missed: avail -0.05 pts"),
        (0.995, 0.454, True, False, "missed: cost +0.004 over"),
        (0.98, 0.47, False, False, "missed: avail -1.00 pts, cost +0.020 over"),
        # misses too small for the usual places keep the digits that show them (found by an
        # audit: "cost +0.000 over" for a cost 0.00014 over the limit)
        (0.995, 0.45014, True, False, "missed: cost +0.0001 over"),
        (0.98996, 0.44, False, True, "missed: avail -0.004 pts"),
        (0.989999, 0.450001, False, False, "missed: avail -0.0001 pts, cost +0.000001 over"),
    ],
)
def test_each_bound_is_judged_and_named(availability, cost, availability_ok, cost_ok, text):
    verdict = judge([*REFS, row("skyhedge", availability, cost)])[("t", "skyhedge")]
    assert (verdict.availability_ok, verdict.cost_ok, verdict.met) == (
        availability_ok,
        cost_ok,
        availability_ok and cost_ok,
    )
    assert verdict.describe() == text


def test_needs_both_references_on_the_same_trace():
    assert judge([row("spothedge", 0.99, 0.5), row("skyhedge", 1.0, 0.3)]) == {}
    assert judge([row("optimal", 1.0, 0.4), row("skyhedge", 1.0, 0.3)]) == {}
    # the references of another trace do not count
    mixed = [*REFS, row("skyhedge", 1.0, 0.3, trace="other")]
    assert judge(mixed) == {}
    # a reference without numbers (no windows) judges nothing
    assert judge([row("spothedge", None, None), REFS[1], row("skyhedge", 1.0, 0.3)]) == {}
    assert judge([REFS[0], row("optimal", None, None), row("skyhedge", 1.0, 0.3)]) == {}


def test_every_other_policy_on_every_trace_is_judged_separately():
    rows = [*REFS, row("skyhedge", 1.0, 0.42), row("even", 0.5, 0.2)]
    rows += [
        row("spothedge", 0.95, 0.6, "u"),
        row("optimal", 1.0, 0.4, "u"),
        row("skyhedge", 0.96, 0.52, "u"),
    ]
    verdicts = judge(rows)
    assert set(verdicts) == {("t", "skyhedge"), ("t", "even"), ("u", "skyhedge")}
    assert verdicts[("t", "skyhedge")].met and not verdicts[("t", "even")].met
    assert not verdicts[("u", "skyhedge")].cost_ok  # 0.52 > (0.6 + 0.4) / 2


def test_annotate_adds_the_verdict_to_judged_rows_only_and_copies():
    rows = [*REFS, row("skyhedge", 0.995, 0.44)]
    out = annotate(rows)
    assert [("vs_spothedge" in r) for r in out] == [False, False, True]
    assert out[2]["vs_spothedge"] == {
        "met": True,
        "availability_ok": True,
        "cost_ok": True,
        "availability_floor": 0.99,
        "cost_limit": 0.45,
        "availability_delta": 0.005,
        "cost_margin": 0.01,
    }
    assert "vs_spothedge" not in rows[2]  # the input is left alone
