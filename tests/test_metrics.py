"""Metric helpers that must agree with prometheus-client's own behaviour."""

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from predictor.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99)


def samples(registry: CollectorRegistry) -> dict:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def test_bulk_observe_equals_one_observe_per_value():
    values = np.concatenate(
        [np.random.default_rng(3).random(500), np.array(BUCKETS), np.array([0.0, 1.0])]
    )
    one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("p", "p", buckets=BUCKETS, registry=one_by_one)
    for value in values.tolist():
        reference.observe(value)
    observe_many(Histogram("p", "p", buckets=BUCKETS, registry=bulk), values)
    expected, actual = samples(one_by_one), samples(bulk)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert abs(actual[key] - value) < 1e-9, key
