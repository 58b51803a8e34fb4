"""The demo builds exactly what the reference records: the same training configs in the same order, the same plan
titles and fingerprints (so ``runs.jsonl`` of an older invocation is still resumed), the same results files and
log, the same ``run_demo`` arguments from the CLI and the same errors.

The reference, ``data/demo_plans.json``, was written by ``demo_plan_capture.py``: first on the code before the
settings were split (issue #19, a change that had to build the same), then again for the intended changes of
issue #17 (seeds and intervals, per-method learning rates, learning-rate selection, 100 caption steps; later
the resolved method config and the benchmark format version in the fingerprints, which also builds one more
config per method and task).
Training, evaluation, the sweeps, data and the base model are stand-ins (see that module)."""

from __future__ import annotations

import json

import pytest
from demo_plan_capture import FIXTURE, SCENARIOS, capture


@pytest.fixture(scope="module")
def captured():
    return json.loads(json.dumps(capture(), sort_keys=True))


@pytest.fixture(scope="module")
def expected():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", [name for name, _, _ in SCENARIOS])
@pytest.mark.parametrize("part", ["events", "runs", "payload", "markdown", "log", "files",
                                  "saved_json_is_the_payload"])
def test_scenario_is_unchanged(captured, expected, name, part):
    assert captured["scenarios"][name][part] == expected["scenarios"][name][part]


def test_cli_and_errors_are_unchanged(captured, expected):
    assert captured["cli"] == expected["cli"]
    assert captured["help"] == expected["help"]
    assert captured["errors"] == expected["errors"]


def test_the_reference_covers_both_settings_and_every_kind_of_run(expected):
    events = [e for s in expected["scenarios"].values() for e in s["events"]]
    kinds = {e[0] for e in events}
    assert {"config", "run_training", "evaluate", "export_vision_tower", "run_sweep"} <= kinds
    configs = [e[1] for e in events if e[0] == "config"]
    assert {"vit_bert"} == {c["model"].get("family") for c in configs if "vision" in c["model"]}
    assert any(c["method"].get("key_pool_size") == 17 for c in configs)  # p-adapter's k capped at the tokens
    assert len(configs) > 90
