"""Bounded topic labels of the delay worker's metrics (workers.delay.metrics)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
