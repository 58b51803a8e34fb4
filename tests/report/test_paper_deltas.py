"""The demo's differences between methods beside the papers' (``vlpeft report --papers``): the claims transcribed
from the specs, the Welch verdicts, the results-file checks and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpeft.cli import main
from vlpeft.metrics.intervals import compare
from vlpeft.report.paper_deltas import (
    PAPER_CLAIMS,
    ResultsFileError,
    check_claims,
    claims_markdown,
    load_demo_scores,
)


def _claim(method: str, baseline: str, task: str):
    return next(c for c in PAPER_CLAIMS if (c.method, c.baseline, c.task) == (method, baseline, task))


def test_claims_are_the_differences_of_table_1():
    # p-adapter.md §7.1, BLIP-CapFilt-L: p-Adapter 70.39 / 79.40 / 130.9, Adapter 69.53 / 78.85 / 128.8,
    # LoRA 66.57 / 77.36 / 128.3, full fine-tuning 70.56 / 78.35 / 128.7
    assert _claim("p-adapter (release)", "Adapter", "vqa").delta == pytest.approx(0.86)
    assert _claim("p-adapter (paper)", "full fine-tuning", "vqa").delta == pytest.approx(-0.17)
    assert _claim("p-adapter (paper)", "full fine-tuning", "vqa").sign == -1
    assert _claim("p-adapter (paper)", "full fine-tuning", "snli_ve").delta == pytest.approx(1.05)
    assert _claim("Adapter", "LoRA", "caption").delta == pytest.approx(0.5)
    routed = _claim("routed LoRA (matmul)", "LoRA", "caption")
    assert (routed.delta, routed.sign) == (None, 1)
    # 3 tasks x (2 variants x 3 baselines + Adapter-LoRA) + 2 tasks x 2 methods x 4 kinds
    assert len(PAPER_CLAIMS) == 3 * 7 + 2 * 2 * 4
    assert not any(c.task == "snli_ve" and c.method.startswith("routed") for c in PAPER_CLAIMS)


def test_verdicts_follow_sign_and_welch_resolution():
    scores = {
        ("p-adapter (paper)", "vqa"): [55.0, 56.0, 55.5],
        ("Adapter", "vqa"): [50.0, 50.5, 49.5],  # p-adapter clearly above: agrees (paper +0.86)
        ("LoRA", "vqa"): [52.0, 40.0, 60.0],  # noisy: Adapter - LoRA not resolved
        ("full fine-tuning", "vqa"): [58.0, 58.5, 57.5],  # p-adapter below, as the paper: agrees (paper -0.17)
        ("routed LoRA (mul)", "vqa"): [20.0, 21.0, 19.0],  # below a noisy LoRA: as Welch says
        ("routed Adapter (add)", "vqa"): [10.0, 10.5, 9.5],  # far below Adapter: disagrees with the routing paper
        ("routed Adapter (mul)", "caption"): [1.0],  # one seed: no interval; Adapter absent on caption: skipped
    }
    checks = {(c.claim.method, c.claim.baseline): c for c in check_claims(scores)}
    assert checks[("p-adapter (paper)", "Adapter")].verdict == "agrees"
    assert checks[("p-adapter (paper)", "full fine-tuning")].verdict == "agrees"
    assert checks[("routed Adapter (add)", "Adapter")].verdict == "disagrees"
    assert checks[("Adapter", "LoRA")].verdict == "opposite sign, not resolved"  # 50.0 vs 50.67, wide interval
    expected = compare(scores[("routed LoRA (mul)", "vqa")], scores[("LoRA", "vqa")])
    mul = checks[("routed LoRA (mul)", "LoRA")]
    assert (mul.diff, mul.ci95, mul.resolved) == (expected.diff, expected.ci95, expected.resolved)
    assert ("routed Adapter (mul)", "Adapter") not in checks
    assert ("p-adapter (release)", "Adapter") not in checks  # not run: no check
    text = claims_markdown(list(checks.values()))
    assert "| p-adapter Table 1 (BLIP-CapFilt-L) | vqa | p-adapter (paper) − Adapter | +0.86 |" in text
    half = compare(scores[("p-adapter (paper)", "vqa")], scores[("Adapter", "vqa")]).ci95
    assert f"| +0.86 | +5.50 ± {half:.2f} | agrees |" in text


def test_one_seed_resolves_nothing():
    checks = check_claims({("p-adapter (release)", "snli_ve"): [70.0], ("Adapter", "snli_ve"): [50.0]})
    assert len(checks) == 1 and checks[0].ci95 is None and checks[0].verdict == "same sign, not resolved"
    assert "+20.00 (no interval)" in claims_markdown(checks)


def _results_file(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps({"results": records}), encoding="utf-8")
    return path


def _record(label: str, task: str, values: list[float], seeds: list[int] | None) -> dict:
    return {"label": label, "task": task, "values": values, "seeds": seeds}


def test_load_demo_scores_skips_references_and_names_bad_records(tmp_path):
    good = _results_file(tmp_path / "results.json", [
        _record("base, no fine-tuning", "vqa", [3.0], None),
        _record("Adapter", "vqa", [50.0, 51.0], [0, 1]),
    ])
    assert load_demo_scores(good) == {("Adapter", "vqa"): [50.0, 51.0]}
    bad = _results_file(tmp_path / "bad.json", [_record("LoRA", "vqa", [50.0, float("nan")], [0, 1])])
    with pytest.raises(ResultsFileError, match=r"bad\.json: results\[0\] \(LoRA on vqa\): expected finite"):
        load_demo_scores(bad)
    missing = _results_file(tmp_path / "missing.json", [{"label": "LoRA", "task": "vqa"}])
    with pytest.raises(ResultsFileError, match=r"missing\.json: results\[0\] has no \['values'\]"):
        load_demo_scores(missing)
    (tmp_path / "other.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ResultsFileError, match="expected a demo results.json with a 'results' list"):
        load_demo_scores(tmp_path / "other.json")


def test_report_papers_command(tmp_path, capsys):
    results = _results_file(tmp_path / "results.json", [
        _record("Adapter", "snli_ve", [60.0, 61.0, 59.0], [0, 1, 2]),
        _record("p-adapter (release)", "snli_ve", [66.0, 67.0, 65.0], [0, 1, 2]),
    ])
    out = tmp_path / "papers.md"
    assert main(["report", "--papers", str(results), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text(encoding="utf-8")
    assert "| snli_ve | p-adapter (release) − Adapter | +0.55 | +6.00 ± 2.27 | agrees |" in printed
    assert "1 differences: 1 agrees, 0 same sign, not resolved" in printed

    assert main(["report", "--papers", str(results), str(tmp_path)]) == 2
    assert "vlpeft report: error: give run folders or --papers" in capsys.readouterr().err
    assert main(["report"]) == 2
    capsys.readouterr()
    lonely = _results_file(tmp_path / "lonely.json", [_record("LoRA", "caption", [1.0, 1.1], [0, 1])])
    assert main(["report", "--papers", str(lonely)]) == 2
    err = capsys.readouterr().err
    assert "none of the papers' comparisons can be made" in err and "Traceback" not in err
