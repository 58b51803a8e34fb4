"""The demo's results table (mean ± 95 % CI over seeds, below-base markers, parameter share, step time relative to
LoRA), its per-(method, task) records, the comparisons with the baselines, the page and the plot."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from vlpeft.metrics.intervals import T_975
from vlpeft.report.demo_results import (
    DemoRunResult,
    comparison_rows,
    demo_markdown_table,
    reference_results,
    relative_step_times,
    results_markdown,
    score_notes,
    summaries_of,
    table_rows,
    text_table,
    unresolved_pairs,
)
from vlpeft.report.plots import plot_metric_vs_params


def _results() -> list[DemoRunResult]:
    return [
        DemoRunResult("text-only baseline", "vqa", 0, 40.0),
        DemoRunResult("base, no fine-tuning", "vqa", 0, 65.0),
        DemoRunResult("LoRA", "vqa", 0, 60.0, 1000, 101000, 0.10, learning_rate=0.003),
        DemoRunResult("LoRA", "vqa", 1, 62.0, 1000, 101000, 0.10, learning_rate=0.003),
        DemoRunResult("Adapter", "vqa", 0, 70.0, 5000, 105000, 0.15, learning_rate=0.01),
        DemoRunResult("Adapter", "vqa", 1, 74.0, 5000, 105000, 0.15, learning_rate=0.01),
        DemoRunResult("LoRA", "caption", 0, 1.5, 1000, 101000, 0.20, learning_rate=0.03),
        DemoRunResult("Adapter", "caption", 0, 1.7, 5000, 105000, 0.30, learning_rate=0.03),
    ]


def test_table_has_mean_ci95_markers_share_and_relative_step_time():
    header, rows = table_rows(_results())
    assert header[:3] == ["Method", "VQA acc. (%)", "Caption CIDEr-D"]
    by_label = {row[0]: row for row in rows}
    assert [row[0] for row in rows[:2]] == ["text-only baseline", "base, no fine-tuning"]  # references first
    assert by_label["text-only baseline"][1:] == ["40.00", "–", "–", "–", "–"]
    # t_{0.975, 1} * s / sqrt(2) with s = sqrt(2) (LoRA) and sqrt(8) (Adapter); LoRA's mean is below the base
    assert by_label["LoRA"][1] == f"61.00 ± {T_975[1]:.2f} ↓base"
    assert by_label["Adapter"][1] == f"72.00 ± {2 * T_975[1]:.2f}"
    assert by_label["Adapter"][2] == "1.700"  # one seed: no interval
    assert by_label["Adapter"][3] == "5.0k" and by_label["Adapter"][4] == "4.76"
    assert by_label["LoRA"][5] == "1.00×"
    assert by_label["Adapter"][5] == "1.50×"  # mean of 0.15/0.10 and 0.30/0.20


def test_records_per_method_and_task():
    records = {(s.label, s.task): s.to_json() for s in summaries_of(_results(), {("LoRA", "vqa"): "table"})}
    lora = records[("LoRA", "vqa")]
    assert lora["seeds"] == [0, 1] and lora["values"] == [60.0, 62.0] and lora["n"] == 2
    assert lora["mean"] == 61.0 and lora["ci95"] == pytest.approx(T_975[1] * math.sqrt(2) / math.sqrt(2))
    assert lora["learning_rate"] == 0.003 and lora["learning_rate_source"] == "table"
    assert lora["trainable"] == 1000 and lora["percent_of_model"] == pytest.approx(100 * 1000 / 101000, abs=1e-4)
    assert lora["below_base"] is True and lora["below_text_only"] is False
    # Welch: diff -11, half-width t_{0.975, ν} sqrt(2/2 + 8/2) with ν = 5² / (1 + 16) = 25/17
    versus = lora["versus"]["Adapter"]
    assert versus["diff"] == -11.0 and not versus["resolved"] and versus["ci95"] > 11.0
    assert set(lora["versus"]) == {"Adapter"}  # not compared with itself
    caption = records[("Adapter", "caption")]
    assert caption["ci95"] is None and caption["below_base"] is None  # no base score on captioning here
    assert caption["versus"]["LoRA"] == {"baseline": "LoRA", "diff": pytest.approx(0.2), "ci95": None,
                                         "resolved": False}
    reference = records[("base, no fine-tuning", "vqa")]
    assert reference["reference"] and reference["seeds"] is None and reference["learning_rate"] is None


def test_resolved_differences_and_the_list_of_unresolved_ones():
    rows = [DemoRunResult(label, "vqa", seed, value, 10, 100)
            for label, values in (("LoRA", (50.0, 51.0, 52.0)), ("Adapter", (60.0, 61.0, 62.0)),
                                  ("routed LoRA (mul)", (49.0, 58.0, 61.0)))
            for seed, value in enumerate(values)]
    header, table = comparison_rows(rows)
    assert header == ["Method", "VQA vs Adapter", "VQA vs LoRA"]
    by_label = {row[0]: row for row in table}
    assert by_label["LoRA"][1].startswith("-10.00 ± ") and "not resolved" not in by_label["LoRA"][1]
    assert by_label["routed LoRA (mul)"][1].endswith("(not resolved)")
    assert unresolved_pairs(rows) == ["routed LoRA (mul) vs Adapter on vqa", "routed LoRA (mul) vs LoRA on vqa"]


def test_one_seed_says_no_interval_and_markers_are_explained():
    rows = [DemoRunResult("base, no fine-tuning", "vqa", 0, 30.0), DemoRunResult("LoRA", "vqa", 0, 20.0, 1, 2)]
    notes = score_notes(rows)
    assert notes[0].startswith("1 seed, no interval") and any(note.startswith("↓base") for note in notes)
    assert table_rows(rows)[1][1][1] == "20.00 ↓base"
    with pytest.raises(ValueError, match="same seed"):
        summaries_of([*rows, DemoRunResult("LoRA", "vqa", 0, 21.0, 1, 2)])


def test_page_has_the_learning_rates_and_the_unresolved_differences():
    payload = {"command": "vlpeft demo", "machine": "m", "total_seconds": 60.0, "setup_seconds": 5.0, "seeds": [0, 1],
               "runs_total": 6, "runs_reused": 0, "jobs": 2, "threads_per_run": [1],
               "base": {"parameters": 10, "caption_scores": {"CIDEr": 1.0}, "train_seconds": 3.0},
               "benchmark": {"heldout_combinations": [["red", "square"]]}}
    page = results_markdown(payload, _results(), learning_rate_lines=["chosen somehow"],
                            learning_rate_sources={("LoRA", "vqa"): "table"})
    assert "| LoRA | 0.003 (table) | 0.03 |" in page and "chosen somehow" in page
    assert "Not resolved by the seeds (2): LoRA vs Adapter on vqa; LoRA vs Adapter on caption." in page
    assert "every score is the mean ± 95 % confidence half-width" in page


def test_relative_step_times_without_reference_is_none():
    ratios = relative_step_times([DemoRunResult("Adapter", "vqa", 0, 1.0, 1, 2, 0.1)])
    assert ratios == {"Adapter": None}


def test_markdown_and_text_tables_agree():
    md = demo_markdown_table(_results())
    lines = md.splitlines()
    assert lines[0].startswith("| Method | VQA acc. (%)")
    assert len(lines) == 2 + 4
    assert f"| LoRA | 61.00 ± {T_975[1]:.2f} ↓base |" in md
    text = text_table(_results())
    assert f"61.00 ± {T_975[1]:.2f}" in text and text.splitlines()[1].startswith("---")
    assert "↓base: the mean is below" in text


def test_plot_is_written(tmp_path):
    path = plot_metric_vs_params(_results(), tmp_path / "plot.png", title="t")
    with Image.open(path) as image:
        assert image.size[0] > 400 and image.size[1] > 200


def test_errors_and_reference_rows():
    with pytest.raises(ValueError, match="no results"):
        table_rows([])
    rows = reference_results({"vqa": {"accuracy": 40.0}, "snli_ve": {"accuracy": 33.3},
                              "caption": {"CIDEr": 0.5}})
    assert [(r.task, r.metric) for r in rows] == [("vqa", 40.0), ("snli_ve", 33.3), ("caption", 0.5)]
    assert all(r.trainable is None for r in rows)
