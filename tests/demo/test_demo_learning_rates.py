"""The demo's learning rates: the selection grid, the table (reading, merging, entries from a sweep record), the
choice per method and task under each policy, and the committed table itself."""

from __future__ import annotations

import json
import re

import pytest

from vlpeft.demo.blip import DEFAULT_METHODS, SIZES, method_specs
from vlpeft.demo.learning_rates import (
    NOT_IN_TABLE,
    PEFT_GRID,
    TABLE_FILE,
    grid_for,
    learning_rate_lines,
    load_table,
    merge_entries,
    resolve_learning_rates,
    selection_markdown,
    table_entry,
    write_table,
)
from vlpeft.demo.specs import ROUTING_KINDS, TASKS, MethodSpec

LORA = MethodSpec("LoRA", "lora", {"r": 8})
FULL = MethodSpec("full fine-tuning", "full", {}, 5e-4)


def _entry(label, task, rate, preset="default", setting="blip"):
    return {"setting": setting, "label": label, "task": task, "learning_rate": rate, "base_preset": preset,
            "eval_scores": {f"{rate:g}": 1.0}, "command": "c", "git": {"commit": "a" * 40, "dirty": False}}


def _sweep(scores, lr_scale=1.0):
    per_value = [{"learning_rate": lr * lr_scale, "status": "finished" if s is not None else "diverged",
                  "eval": None if s is None else {"n": 1, "mean": s, "std": None, "ci95": None}}
                 for lr, s in scores.items()]
    best = max((v for v in per_value if v["eval"]), key=lambda v: v["eval"]["mean"])
    return {"metric": "accuracy", "grid": {"learning_rates": [v["learning_rate"] for v in per_value], "seeds": [0]},
            "per_value": per_value, "selected": {"learning_rate": best["learning_rate"], "eval": best["eval"],
                                                 "test": {"scores": {"0": 50.0}}},
            "command": "vlpeft demo --select-learning-rates", "git": {"commit": "b" * 40, "dirty": False},
            "written_at": "2026-12-07T00:00:00+0000"}


def test_grid_is_the_peft_grid_and_ten_times_lower_for_full_fine_tuning():
    assert grid_for(LORA) == PEFT_GRID == (1e-3, 3e-3, 1e-2, 3e-2)
    assert grid_for(FULL) == (1e-4, 3e-4, 1e-3, 3e-3)
    assert grid_for(LORA, (5e-3, 2e-3)) == (2e-3, 5e-3)  # ascending: ties go to the smaller rate


def test_table_entry_from_a_sweep_record():
    size = SIZES["default"]
    entry = table_entry(setting="blip", spec=LORA, task="snli_ve", size_name="default", size=size,
                        base_digest="d", sweep=_sweep({1e-3: 40.0, 3e-3: 55.0, 1e-2: 50.0, 3e-2: None}))
    assert entry["learning_rate"] == 3e-3 and not entry["at_grid_edge"]
    assert entry["eval_scores"] == {"0.001": 40.0, "0.003": 55.0, "0.01": 50.0, "0.03": None}
    assert entry["steps"] == size.steps_ve and entry["base_preset"] == "default" and entry["base_digest"] == "d"
    assert entry["git"]["commit"] == "b" * 40 and entry["test_of_selected"] == {"0": 50.0}
    edge = table_entry(setting="blip", spec=LORA, task="vqa", size_name="smoke",
                       size=SIZES["smoke"].__class__(**{**SIZES["smoke"].__dict__, "lr_scale": 2.0}),
                       base_digest="d", sweep=_sweep({1e-3: 10.0, 3e-2: 20.0}, lr_scale=2.0))
    assert edge["learning_rate"] == 3e-2 and edge["at_grid_edge"]  # stored before lr_scale
    assert "**0.06: 20.000**" in selection_markdown([edge]) and "(edge)" in selection_markdown([edge])


def test_table_round_trip_merge_and_errors(tmp_path):
    path = tmp_path / "t.json"
    assert load_table(path) == []
    write_table(path, [_entry("LoRA", "vqa", 1e-3), _entry("Adapter", "vqa", 3e-3)])
    merged = merge_entries(load_table(path), [_entry("LoRA", "vqa", 1e-2), _entry("LoRA", "caption", 3e-2)])
    assert [(e["label"], e["task"], e["learning_rate"]) for e in merged] == [
        ("LoRA", "vqa", 1e-2), ("Adapter", "vqa", 3e-3), ("LoRA", "caption", 3e-2)]
    with pytest.raises(ValueError, match="needs the keys"):
        write_table(path, [{"label": "LoRA"}])
    path.write_text(json.dumps({"format_version": 99, "entries": []}))
    with pytest.raises(ValueError, match="not a learning-rate table"):
        load_table(path)


def test_choice_per_policy():
    table = [_entry("LoRA", "vqa", 1e-2), _entry("LoRA", "caption", 3e-2, preset="smoke"),
             _entry("Adapter", "vqa", 3e-3, setting="composite")]
    specs, tasks = [LORA, MethodSpec("Adapter", "adapter"), FULL], ["vqa", "caption"]
    chosen = resolve_learning_rates("table", specs, tasks, setting="blip", size=SIZES["default"], table=table)
    assert (chosen[("LoRA", "vqa")].learning_rate, chosen[("LoRA", "vqa")].source) == (1e-2, "table")
    assert chosen[("LoRA", "vqa")].to_json()["selected_by"]["command"] == "c"
    for key, rate in ((("LoRA", "caption"), 5e-3), (("Adapter", "vqa"), 5e-3), (("full fine-tuning", "vqa"), 5e-4)):
        assert (chosen[key].learning_rate, chosen[key].source) == (rate, NOT_IN_TABLE)  # other base / setting
    shared = resolve_learning_rates("shared", specs, tasks, setting="blip", size=SIZES["default"], table=table)
    assert {c.source for c in shared.values()} == {"shared"} and "selected_by" not in shared[("LoRA", "vqa")].to_json()
    selected = resolve_learning_rates("select", [LORA], ["vqa"], setting="blip", size=SIZES["default"],
                                      selected=[_entry("LoRA", "vqa", 3e-2)])
    assert selected[("LoRA", "vqa")].learning_rate == 3e-2
    with pytest.raises(ValueError, match="no selected learning rate for LoRA on caption"):
        resolve_learning_rates("select", [LORA], ["caption"], setting="blip", size=SIZES["default"], selected=[])
    with pytest.raises(ValueError, match="unknown learning-rate policy"):
        resolve_learning_rates("best", [LORA], ["vqa"], setting="blip", size=SIZES["default"])


def test_page_lines_name_the_provenance_and_a_table_selected_on_another_base():
    entry = {**_entry("LoRA", "vqa", 1e-2), "base_digest": "old", "size": "default", "selection_seeds": [0]}
    choices = resolve_learning_rates("table", [LORA, MethodSpec("Adapter", "adapter")], ["vqa"], setting="blip",
                                     size=SIZES["default"], table=[entry])
    record = {"policy": "table", "table": "x/learning_rates.json"}
    lines = learning_rate_lines(record, choices, "new")
    assert any(f"selected by `c` at commit {'a' * 40}, size default, selection seed(s) [0]" in line for line in lines)
    assert any("another build" in line and "old" in line for line in lines)
    assert any(line.endswith("shared rate: Adapter on vqa") for line in lines)
    assert not any("another build" in line for line in learning_rate_lines(record, choices, "old"))


def test_committed_table_covers_the_default_demo_and_records_each_selection():
    entries = load_table(TABLE_FILE)
    specs = {spec.label: spec for spec in method_specs(ROUTING_KINDS)}
    keys = [(e["setting"], e["label"], e["task"]) for e in entries]
    assert len(set(keys)) == len(keys)
    assert {("blip", label, task) for label in DEFAULT_METHODS for task in TASKS} <= set(keys)
    for entry in entries:
        grid = entry["grid"]
        assert entry["base_preset"] == "default" and entry["split"] == "eval" and entry["label"] in specs
        assert entry["method"]["type"] == specs[entry["label"]].type
        assert entry["learning_rate"] in grid and entry["lr_scale"] == 1.0
        scores = entry["eval_scores"]
        assert list(scores) == [f"{value:g}" for value in grid]
        finite = [(value, scores[f"{value:g}"]) for value in grid if scores[f"{value:g}"] is not None]
        assert entry["learning_rate"] == max(finite, key=lambda pair: pair[1])[0]  # best on eval, first on ties
        assert entry["at_grid_edge"] == (entry["learning_rate"] in (min(grid), max(grid)))
        assert re.fullmatch(r"[0-9a-f]{40}", entry["git"]["commit"]) and entry["git"]["dirty"] is False
        # selected by a full run (``vlpeft demo --full``) or a selection-only one; the size follows the command
        assert entry["command"].startswith(("vlpeft demo --full", "vlpeft demo --select-learning-rates"))
        full = entry["command"].startswith("vlpeft demo --full") or " --size full" in entry["command"]
        assert entry["size"] == ("full" if full else "default") and entry["selection_seeds"] == [0]
        assert not any(word.startswith("/") for word in entry["command"].split())  # no absolute paths


def test_cli_refuses_update_table_without_a_table_or_a_selection(capsys):
    from vlpeft.cli import main

    assert main(["demo", "--update-table", "--select-learning-rates"]) == 2
    assert "--update-table needs --lr-table" in capsys.readouterr().err
    assert main(["demo", "--update-table", "--lr-table", "t.json"]) == 2
    assert "use it with --select-learning-rates" in capsys.readouterr().err
