"""Invariant 2: the GPU-seconds billed to requests add up to the engine's busy time."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.metering import Meter, WindowMeter

# A schedule: steps, each with a duration and the requests in it with their share of the work.
steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=5, allow_nan=False),
        st.dictionaries(
            st.integers(min_value=0, max_value=12),
            st.floats(min_value=0.001, max_value=1000, allow_nan=False),
            min_size=1,
            max_size=8,
        ),
    ),
    max_size=60,
)


@given(steps)
def test_billed_equals_busy_for_any_overlap_pattern(schedule):
    meter, opened, billed = Meter(), set(), {}
    last_step = {}
    for index, (_, work) in enumerate(schedule):
        for account in work:
            last_step[account] = index
    for index, (seconds, work) in enumerate(schedule):
        for account in work:
            if account not in opened:  # arrives
                meter.open(account)
                opened.add(account)
        meter.charge(seconds, work)
        for account in work:
            if last_step[account] == index:  # finishes
                billed[account] = meter.close(account)
    busy = sum(seconds for seconds, _ in schedule)
    assert sum(billed.values()) == pytest.approx(busy, rel=1e-9, abs=1e-9)
    assert meter.busy_seconds == pytest.approx(busy, rel=1e-9, abs=1e-9)
    assert all(value >= 0 for value in billed.values())
    for account, value in billed.items():  # nobody pays for a step it was not in
        in_steps = sum(seconds for seconds, work in schedule if account in work)
        assert value <= in_steps * (1 + 1e-9) + 1e-12


def test_shares_follow_the_work():
    meter = Meter()
    for account in "abc":
        meter.open(account)
    meter.charge(1.0, {"a": 1, "b": 3})
    meter.charge(0.5, {"c": 1})
    assert meter.close("a") == pytest.approx(0.25)
    assert meter.close("b") == pytest.approx(0.75)
    assert meter.close("c") == pytest.approx(0.5)


def test_time_must_go_to_some_work():
    meter = Meter()
    with pytest.raises(ValueError, match="charged to the work"):
        meter.charge(1.0, {})


# Events for WindowMeter: (gap before the event, kind, request, tokens).
events = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=0.1, allow_nan=False),
        st.sampled_from(["start", "output", "output", "output", "finish"]),
        st.integers(min_value=0, max_value=6),
        st.integers(min_value=1, max_value=600),
    ),
    max_size=80,
)


@given(events, st.sampled_from([0.0, 0.01, 0.05]))
def test_window_meter_bills_exactly_the_busy_time(script, window):
    meter, clock, active, billed, busy = WindowMeter(window), 0.0, set(), [], 0.0
    for gap, kind, request, tokens in script:
        if active:
            busy += gap
        clock += gap
        if kind == "start" and request not in active:
            meter.start(request, clock)
            active.add(request)
        elif kind == "output" and request in active:
            meter.output(request, tokens, clock)
        elif kind == "finish" and request in active:
            billed.append(meter.finish(request, clock))
            active.discard(request)
    for request in sorted(active):
        billed.append(meter.finish(request, clock))
    assert sum(billed) == pytest.approx(busy, rel=1e-9, abs=1e-9)
    assert all(value >= 0 for value in billed)
