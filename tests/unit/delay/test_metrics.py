"""Bounded topic labels of the delay worker's metrics (workers.delay.metrics)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.delay.metrics import OTHER, TopicLabels, top_and_other


def test_first_n_topics_keep_their_label_later_ones_are_other() -> None:
    labels = TopicLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "b", "d")] == ["a", "b", OTHER, "a", "b", OTHER]


def test_no_topic_labels_at_all_with_zero() -> None:
    assert TopicLabels(0)("a") == OTHER


def test_labels_stay_bounded_when_lanes_ask_from_many_threads() -> None:
    labels = TopicLabels(10)
    with ThreadPoolExecutor(8) as pool:
        got = set(pool.map(labels, [f"t{i}" for i in range(1000)]))
    assert len(got - {OTHER}) == 10 and OTHER in got


def test_top_and_other_adds_the_rest_up() -> None:
    counts = {"a": 5, "b": 1, "c": 3, "d": 2}
    assert top_and_other(counts, 2) == [("a", 5), ("c", 3), (OTHER, 3)]
    assert top_and_other(counts, 4) == [("a", 5), ("c", 3), ("d", 2), ("b", 1)]
    assert top_and_other(counts, 0) == [(OTHER, 11)]
    assert top_and_other({}, 3) == []


def test_stored_topics_get_a_zero_lateness_series_within_the_bound() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from workers.delay.config import DelaySettings
    from workers.delay.metrics import DelayMetrics

    metrics = DelayMetrics(CollectorRegistry(), DelaySettings(lateness_metric_topics=2))
    metrics.track_topics(["a", "b", "c"])
    metrics.observe_lateness("d", [0.5])
    text = generate_latest(metrics.registry).decode()
    assert 'bridge_delay_lateness_seconds_count{topic="a"} 0.0' in text
    assert 'bridge_delay_lateness_seconds_count{topic="b"} 0.0' in text
    assert 'bridge_delay_lateness_seconds_count{topic="other"} 1.0' in text
    assert 'topic="c"' not in text and 'topic="d"' not in text


@given(
    st.lists(
        st.one_of(
            st.floats(min_value=-1, max_value=400, allow_nan=False),
            st.sampled_from([0.0001, 0.001, 0.05, 1.0, 300.0, 0.0]),  # on a bound: its bucket
        ),
        max_size=60,
    ),
    st.integers(min_value=1, max_value=5),
)
def test_the_batch_histogram_exposes_what_prometheus_clients_histogram_does(
    values: list[float], batches: int
) -> None:
    """Same buckets (le <= bound), count and sum as prometheus_client's own Histogram fed
    one value at a time, in the same text exposition."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from workers.delay.metrics import LATENCY_BUCKETS, BatchHistogram

    theirs, mine = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "doc", ["topic"], buckets=LATENCY_BUCKETS, registry=theirs)
    batch = BatchHistogram("h_seconds", "doc", "topic", LATENCY_BUCKETS)
    mine.register(batch)
    batch.series("idle")
    reference.labels("idle")
    for i in range(batches):
        part = values[i::batches]
        batch.observe("t", part)
        series = reference.labels("t")  # a batch, even an empty one, creates the series
        for v in part:
            series.observe(v)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [ln for ln in text.splitlines() if "_created" not in ln and not ln.startswith("#")]

    def parsed(registry: CollectorRegistry) -> dict[str, float]:
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines(registry)}

    got, want = parsed(mine), parsed(theirs)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
