"""The pure metering core: delta rules and the incremental ``diff_series``."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from billing_cli.core.metering import delta, diff_series, minute_of, series_usage
from billing_cli.core.types import Observation

M = 60_000_000_000  # one minute in ns
BIG = 2**62 + 12345  # far beyond 2^53: floats would lose these bytes


def obs(t: int, up: int, down: int, epoch: str | None = None) -> Observation:
    return Observation(t, up, down, epoch)


# --- delta -------------------------------------------------------------------------------


def test_plain_increase_is_difference() -> None:
    d = delta(obs(0, 100, 50), obs(M, 160, 70))
    assert (d.uplink, d.downlink, d.restart, d.anomaly) == (60, 20, False, False)


def test_epoch_change_is_restart_even_without_drop() -> None:
    d = delta(obs(0, 100, 50, "a"), obs(M, 500, 500, "b"))
    assert (d.uplink, d.downlink, d.restart) == (500, 500, True)


def test_drop_without_epoch_is_restart_in_both_directions() -> None:
    # Only the uplink dropped, yet both directions bill the new totals.
    d = delta(obs(0, 100, 50), obs(M, 10, 80))
    assert (d.uplink, d.downlink, d.restart) == (10, 80, True)


def test_drop_with_epoch_missing_on_one_side_is_restart() -> None:
    d = delta(obs(0, 100, 50, "a"), obs(M, 10, 80, None))
    assert (d.uplink, d.downlink, d.restart) == (10, 80, True)


def test_drop_within_one_epoch_is_anomaly_billing_nothing() -> None:
    d = delta(obs(0, 100, 50, "a"), obs(M, 90, 60, "a"))
    assert (d.uplink, d.downlink, d.anomaly, d.restart) == (0, 0, True, False)


def test_counters_beyond_2_pow_53_are_exact() -> None:
    d = delta(obs(0, BIG, BIG), obs(M, BIG + 1, BIG + 3))
    assert (d.uplink, d.downlink) == (1, 3)


# --- whole series --------------------------------------------------------------------------


def test_baseline_bills_nothing() -> None:
    assert series_usage([obs(5, 10**12, 10**12)]) == {}
    assert diff_series([], [obs(5, 10**12, 10**12)]).bucket_deltas == {}


def test_usage_goes_to_minute_of_later_observation_and_adds_up() -> None:
    series = [obs(M - 1, 0, 0), obs(M + 1, 10, 1), obs(2 * M - 1, 15, 2), obs(2 * M, 20, 3)]
    assert series_usage(series) == {M: (15, 2), 2 * M: (5, 1)}


def test_zero_usage_writes_no_bucket() -> None:
    d = diff_series([obs(0, 10, 10)], [obs(M, 10, 10)])
    assert d.bucket_deltas == {}
    assert d.inserted == [obs(M, 10, 10)]  # the idle observation is still stored
    assert d.new_head == obs(M, 10, 10)


def test_in_order_observation_after_head() -> None:
    d = diff_series([obs(0, 10, 10)], [obs(M + 7, 15, 30)])
    assert d.bucket_deltas == {M: (5, 20)}
    assert d.duplicates == 0
    assert not d.conflicts
    assert not d.anomalies


def test_anomaly_is_reported_once_and_replay_reports_nothing() -> None:
    first = diff_series([obs(0, 10, 10, "e")], [obs(M, 5, 10, "e")])
    assert first.bucket_deltas == {}
    assert len(first.anomalies) == 1
    assert "dropped within epoch" in first.anomalies[0].detail
    replay = diff_series([obs(0, 10, 10, "e"), obs(M, 5, 10, "e")], [obs(M, 5, 10, "e")])
    assert replay.duplicates == 1
    assert not replay.anomalies
    assert not replay.inserted


def test_anomaly_observation_is_new_reference() -> None:
    # After the drop, usage continues from the lower value.
    assert series_usage([obs(0, 10, 10, "e"), obs(M, 5, 5, "e"), obs(2 * M, 8, 9, "e")]) == {
        2 * M: (3, 4)
    }


def test_duplicate_and_conflict_keep_the_first() -> None:
    stored = [obs(0, 10, 10), obs(M, 20, 20)]
    d = diff_series(
        stored, [obs(M, 20, 20), obs(M, 99, 99), obs(2 * M, 30, 30), obs(2 * M, 31, 30)]
    )
    assert d.duplicates == 1
    assert [(c.kept, c.refused) for c in d.conflicts] == [
        (obs(M, 20, 20), obs(M, 99, 99)),
        (obs(2 * M, 30, 30), obs(2 * M, 31, 30)),
    ]
    assert d.inserted == [obs(2 * M, 30, 30)]
    assert d.bucket_deltas == {2 * M: (10, 10)}


def test_conflicting_epoch_only_is_a_conflict() -> None:
    d = diff_series([obs(0, 10, 10, "a")], [obs(0, 10, 10, "b")])
    assert len(d.conflicts) == 1
    assert not d.inserted


def test_late_item_splits_a_delta() -> None:
    # Stored 0 -> 3M bills 30 at minute 3; a late observation at 1M moves 10 to minute 1.
    d = diff_series([obs(0, 0, 0), obs(3 * M, 30, 60)], [obs(M, 10, 20)])
    assert d.bucket_deltas == {M: (10, 20), 3 * M: (-10, -20)}
    assert d.new_head is None


def test_late_item_before_baseline_becomes_new_baseline() -> None:
    d = diff_series([obs(M, 10, 10)], [obs(0, 4, 4)])
    assert d.bucket_deltas == {M: (6, 6)}


def test_late_restart_between_observations() -> None:
    # Without the late point: 100 -> 50 is a restart billing 50. With it (100 -> 5 -> 50):
    # restart billing 5, then 45: the same total, split across minutes.
    d = diff_series([obs(0, 100, 100), obs(2 * M, 50, 50)], [obs(M, 5, 5)])
    assert d.bucket_deltas == {M: (5, 5), 2 * M: (-5, -5)}


# --- property: incremental diffs equal the clean computation ------------------------------


def _series_strategy() -> st.SearchStrategy[list[Observation]]:
    step = st.tuples(
        st.integers(1, 3 * M),
        st.integers(-50, 1000),
        st.integers(-50, 1000),
        st.sampled_from([None, "a", "b"]),
    )
    return st.lists(step, min_size=1, max_size=12).map(_build)


def _build(steps: list[tuple[int, int, int, str | None]]) -> list[Observation]:
    t, up, down, out = 0, 0, 0, []
    for dt, du, dd, ep in steps:
        t += dt
        up, down = max(up + du, 0), max(down + dd, 0)
        out.append(obs(t, up, down, ep))
    return out


@given(_series_strategy(), st.randoms(use_true_random=False))
def test_any_delivery_order_converges(series: list[Observation], rnd: random.Random) -> None:
    stored: list[Observation] = []
    buckets: dict[int, list[int]] = {}
    order = list(series)
    rnd.shuffle(order)
    chunks: list[list[Observation]] = []
    while order:
        n = rnd.randint(1, 4)
        chunk, order = order[:n], order[n:]
        chunk += rnd.sample(series, k=min(len(series), rnd.randint(0, 2)))  # replays
        chunks.append(chunk)
    for chunk in chunks:
        ts = [o.collected_at_ns for o in chunk]
        lo, hi = min(ts), max(ts)
        before = [o for o in stored if o.collected_at_ns < lo]
        after = [o for o in stored if o.collected_at_ns > hi]
        window = before[-1:] + [o for o in stored if lo <= o.collected_at_ns <= hi] + after[:1]
        d = diff_series(window, chunk)
        assert not d.conflicts
        for m, (du, dd) in d.bucket_deltas.items():
            acc = buckets.setdefault(m, [0, 0])
            acc[0] += du
            acc[1] += dd
        stored = sorted(stored + d.inserted)
    final = {m: (u, d) for m, (u, d) in buckets.items() if u or d}
    assert final == series_usage(series)
    assert all(u >= 0 and d >= 0 for u, d in final.values())
    assert all(m == minute_of(m) for m in final)
