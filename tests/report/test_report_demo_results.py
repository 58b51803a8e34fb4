"""The demo's results table (mean ± std, parameter share, step time relative to LoRA) and plot."""

from __future__ import annotations

import pytest
from PIL import Image

from vlpeft.report.demo_results import (
    DemoRunResult,
    demo_markdown_table,
    reference_results,
    relative_step_times,
    table_rows,
    text_table,
)
from vlpeft.report.plots import plot_metric_vs_params


def _results() -> list[DemoRunResult]:
    return [
        DemoRunResult("text-only baseline", "vqa", 0, 40.0),
        DemoRunResult("LoRA", "vqa", 0, 60.0, 1000, 101000, 0.10),
        DemoRunResult("LoRA", "vqa", 1, 62.0, 1000, 101000, 0.10),
        DemoRunResult("Adapter", "vqa", 0, 70.0, 5000, 105000, 0.15),
        DemoRunResult("Adapter", "vqa", 1, 74.0, 5000, 105000, 0.15),
        DemoRunResult("LoRA", "caption", 0, 1.5, 1000, 101000, 0.20),
        DemoRunResult("Adapter", "caption", 0, 1.7, 5000, 105000, 0.30),
    ]


def test_table_has_mean_std_share_and_relative_step_time():
    header, rows = table_rows(_results())
    assert header[:3] == ["Method", "VQA acc. (%)", "Caption CIDEr-D"]
    by_label = {row[0]: row for row in rows}
    assert rows[0][0] == "text-only baseline"  # references first
    assert by_label["text-only baseline"][1:] == ["40.00", "–", "–", "–", "–"]
    assert by_label["LoRA"][1] == "61.00 ± 1.41"
    assert by_label["Adapter"][1] == "72.00 ± 2.83"
    assert by_label["Adapter"][2] == "1.700"  # one seed: no std
    assert by_label["Adapter"][3] == "5.0k" and by_label["Adapter"][4] == "4.76"
    assert by_label["LoRA"][5] == "1.00×"
    assert by_label["Adapter"][5] == "1.50×"  # mean of 0.15/0.10 and 0.30/0.20


def test_relative_step_times_without_reference_is_none():
    ratios = relative_step_times([DemoRunResult("Adapter", "vqa", 0, 1.0, 1, 2, 0.1)])
    assert ratios == {"Adapter": None}


def test_markdown_and_text_tables_agree():
    md = demo_markdown_table(_results())
    lines = md.splitlines()
    assert lines[0].startswith("| Method | VQA acc. (%)")
    assert len(lines) == 2 + 3
    assert "| LoRA | 61.00 ± 1.41 |" in md
    text = text_table(_results())
    assert "61.00 ± 1.41" in text and text.splitlines()[1].startswith("---")


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
