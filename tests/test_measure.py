"""The measurement children behind `ortzo bench --engines` and `ortzo memory --validate`."""
from __future__ import annotations

import json

from ortzo.recipes.measure import in_child, peak_rss_mib


def test_a_childs_peak_rss_is_its_own_not_its_parents(tiny_model):
    """This pytest process holds torch and transformers (hundreds of MiB); an ORT child must not
    report that: Linux carries a parent's ru_maxrss into a child at exec, VmHWM starts afresh."""
    import torch  # noqa: F401  (make sure the parent is big)

    parent = peak_rss_mib()
    child = in_child("steps", tiny_model, "ort", 2, 8, 1, "{}")
    assert parent > 300 and child["peak_rss_mib"] < 150 and child["step_s"] > 0


def test_each_engine_steps_in_a_child(tiny_model):
    for engine, settings in (("torch-bp", {"optimizer": "sgd"}), ("torch-mezo", {})):
        r = in_child("steps", tiny_model, engine, 2, 8, 1, json.dumps(settings))
        assert r["peak_rss_mib"] > 200 and r["step_s"] > 0  # torch's own libraries alone are more
    times = in_child("interleaved", tiny_model, 2, 8, 2, "ort", "torch-mezo")
    assert set(times) == {"ort", "torch-mezo"} and all(t > 0 for t in times.values())
