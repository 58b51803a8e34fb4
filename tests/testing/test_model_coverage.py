"""Generality beyond the twins: every image-text-to-text model type of transformers, built on the meta device,
with every method's defaults — attached, or refused at attach time with a ValueError that says what is missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers

from vlpeft.testing.coverage import METHODS, coverage, render_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


@pytest.fixture(scope="module")
def attempts():
    return coverage()


def test_no_method_fails_other_than_by_a_clear_refusal(attempts) -> None:
    bugs = [a for a in attempts if a.status == "error"]
    assert not bugs, bugs
    assert all(a.detail for a in attempts if a.status == "refused")


def test_coverage_targets(attempts) -> None:
    built = {a.model_type for a in attempts if a.status != "no build"}
    assert len(built) >= 80
    attached = {m: sum(a.status == "ok" for a in attempts if a.method == m) / len(built) for m in METHODS}
    for method in ("routed LoRA", "Adapter", "routed Adapter", "LoRA"):
        assert attached[method] >= 0.75, attached
    for method in ("p-adapter release", "p-adapter paper"):
        assert attached[method] >= 2 / 3, attached


def test_the_named_families_attach_every_method(attempts) -> None:
    named = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "llava_next", "llava_onevision",
             "internvl", "mllama", "mistral3", "llava", "paligemma", "blip-2"}
    missing = [(a.model_type, a.method, a.detail) for a in attempts if a.model_type in named and a.status != "ok"]
    assert not missing


def test_docs_table_is_the_walk_of_the_installed_transformers(attempts) -> None:
    text = DOC.read_text()
    recorded = re.search(r"transformers (\d+\.\d+\.\d+)", text)
    assert recorded and START in text and END in text
    if recorded.group(1) != transformers.__version__:
        pytest.skip(f"docs/models.md records transformers {recorded.group(1)}, {transformers.__version__} installed")
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == render_markdown(attempts).strip()
