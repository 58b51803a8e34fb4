"""The demo's differences between methods, side by side with the differences the two papers report.

A *claim* is one difference a paper reports: method minus baseline on one task, with the paper's value where the
spec transcribes it (``../shared/spec/p-adapter.md`` §7.1, Table 1, BLIP-CapFilt-L; ``routing.md`` §11, where only
the direction of the routing functions' gain is confirmed). For each claim the demo's difference is the Welch
comparison of the two methods' per-seed scores (:func:`vlpeft.metrics.intervals.compare`), and the verdict says
whether its sign agrees with the paper's and whether the seeds resolve it:

- ``agrees``: same sign, resolved (the Welch 95 % interval excludes 0);
- ``same sign, not resolved`` / ``opposite sign, not resolved``: the interval includes 0;
- ``disagrees``: opposite sign, resolved.

Magnitudes are not compared: the demo's 1.5 M-parameter base on synthetic data is not the papers' setting, and the
caption scores are on pycocoevalcap's scale (the papers print CIDEr x 100).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlpeft.metrics.intervals import compare
from vlpeft.training.config import ConfigError

__all__ = ["PAPER_CLAIMS", "ClaimCheck", "PaperClaim", "ResultsFileError", "check_claims", "claims_markdown",
           "claims_report", "load_demo_scores"]


class ResultsFileError(ConfigError):
    """The file given to ``vlpeft report --papers`` is not a usable demo results file (the CLI exits with 2)."""

#: p-adapter paper, Table 1, BLIP-CapFilt-L (p-adapter.md §7.1): VQA2 Karpathy test accuracy, SNLI-VE test-P
#: accuracy, COCO Karpathy test CIDEr (x 100).
P_ADAPTER_TABLE_1: dict[str, dict[str, float]] = {
    "vqa": {"full fine-tuning": 70.56, "LoRA": 66.57, "Adapter": 69.53, "p-adapter": 70.39},
    "snli_ve": {"full fine-tuning": 78.35, "LoRA": 77.36, "Adapter": 78.85, "p-adapter": 79.40},
    "caption": {"full fine-tuning": 128.7, "LoRA": 128.3, "Adapter": 128.8, "p-adapter": 130.9},
}
P_ADAPTER_SOURCE = "p-adapter Table 1 (BLIP-CapFilt-L)"
ROUTING_SOURCE = "routing abstract (best routing function; per-function numbers not transcribed)"
#: The demo's labels of the paper's p-Adapter row: both variants (the equations and the released code).
P_ADAPTER_LABELS = ("p-adapter (paper)", "p-adapter (release)")
ROUTING_KINDS = ("mul", "add", "matmul", "matmul_expand")


@dataclass(frozen=True)
class PaperClaim:
    """``method`` - ``baseline`` on ``task`` as a paper reports it: ``delta`` (``None`` when only the sign is
    known) and its ``sign`` (+1 or -1)."""

    source: str
    method: str
    baseline: str
    task: str
    sign: int
    delta: float | None = None


def _p_adapter_claims() -> list[PaperClaim]:
    claims = []
    for task, scores in P_ADAPTER_TABLE_1.items():
        pairs = [(label, "p-adapter", baseline) for label in P_ADAPTER_LABELS
                 for baseline in ("Adapter", "LoRA", "full fine-tuning")]
        pairs.append(("Adapter", "Adapter", "LoRA"))
        for label, paper_row, baseline in pairs:
            delta = round(scores[paper_row] - scores[baseline], 4)
            claims.append(PaperClaim(P_ADAPTER_SOURCE, label, baseline, task, 1 if delta >= 0 else -1, delta))
    return claims


def _routing_claims() -> list[PaperClaim]:
    return [PaperClaim(ROUTING_SOURCE, f"routed {plain} ({kind})", plain, task, +1)
            for task in ("vqa", "caption") for plain in ("LoRA", "Adapter") for kind in ROUTING_KINDS]


#: Every claim the demo's methods can be checked against.
PAPER_CLAIMS: tuple[PaperClaim, ...] = (*_p_adapter_claims(), *_routing_claims())


@dataclass(frozen=True)
class ClaimCheck:
    """One claim and the demo's difference: ``diff`` ± ``ci95`` (Welch; ``None`` with one seed on a side)."""

    claim: PaperClaim
    diff: float
    ci95: float | None
    resolved: bool

    @property
    def verdict(self) -> str:
        same = (self.diff > 0) == (self.claim.sign > 0) and self.diff != 0.0
        if self.resolved:
            return "agrees" if same else "disagrees"
        return "same sign, not resolved" if same else "opposite sign, not resolved"


def load_demo_scores(path: str | Path) -> dict[tuple[str, str], list[float]]:
    """Per-seed scores by (label, task) from a demo's ``results.json`` (its ``results`` records; references,
    which have no seeds, are left out).

    Raises:
        ResultsFileError: the file is not a demo results file with per-seed records (naming the file and what is
            missing).
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ResultsFileError(f"{path}: cannot read a demo results file: {error}") from error
    records = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(records, list):
        raise ResultsFileError(f"{path}: expected a demo results.json with a 'results' list (written by `vlpeft demo`)")
    scores: dict[tuple[str, str], list[float]] = {}
    for index, record in enumerate(records):
        missing = [key for key in ("label", "task", "values") if key not in record]
        if missing:
            raise ResultsFileError(f"{path}: results[{index}] has no {missing}")
        if record.get("seeds") is None:
            continue
        values = [float(v) for v in record["values"]]
        if not values or not all(math.isfinite(v) for v in values):
            raise ResultsFileError(f"{path}: results[{index}] ({record['label']} on {record['task']}): expected finite "
                             f"per-seed values, got {record['values']!r}")
        scores[(record["label"], record["task"])] = values
    return scores


def check_claims(scores: Mapping[tuple[str, str], Sequence[float]],
                 claims: Sequence[PaperClaim] = PAPER_CLAIMS) -> list[ClaimCheck]:
    """The claims whose two methods the demo ran on the claim's task, in the order of ``claims``."""
    checks = []
    for claim in claims:
        a, b = scores.get((claim.method, claim.task)), scores.get((claim.baseline, claim.task))
        if a is None or b is None:
            continue
        difference = compare(a, b)
        checks.append(ClaimCheck(claim, difference.diff, difference.ci95, difference.resolved))
    return checks


def _demo_diff(check: ClaimCheck, digits: int) -> str:
    if check.ci95 is None:
        return f"{check.diff:+.{digits}f} (no interval)"
    return f"{check.diff:+.{digits}f} ± {check.ci95:.{digits}f}"


def claims_markdown(checks: Sequence[ClaimCheck]) -> str:
    """A markdown table of ``checks`` and a count of the verdicts per source."""
    lines = ["| Paper | Task | Method − baseline | Paper's difference | Demo's difference | Verdict |",
             "|---|---|---|---:|---:|---|"]
    for check in checks:
        claim = check.claim
        digits = 3 if claim.task == "caption" else 2
        paper = "+ (sign only)" if claim.delta is None else f"{claim.delta:+.2f}"
        lines.append(f"| {claim.source} | {claim.task} | {claim.method} − {claim.baseline} | {paper} | "
                     f"{_demo_diff(check, digits)} | {check.verdict} |")
    lines.append("")
    for source in dict.fromkeys(check.claim.source for check in checks):
        verdicts = [check.verdict for check in checks if check.claim.source == source]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in
                           ("agrees", "same sign, not resolved", "opposite sign, not resolved", "disagrees"))
        lines.append(f"- {source}: {len(verdicts)} differences: {counts}.")
    return "\n".join(lines) + "\n"


def claims_report(results_json: str | Path) -> str:
    """The markdown of :func:`claims_markdown` for a demo's ``results.json``.

    Raises:
        ResultsFileError: the file is not a demo results file, or none of the claims can be checked with it.
    """
    checks = check_claims(load_demo_scores(results_json))
    if not checks:
        raise ResultsFileError(f"{results_json}: none of the papers' comparisons can be made: the file needs "
                               "per-seed results of at least one method and its baseline on the same task (e.g. "
                               "p-adapter and Adapter)")
    return claims_markdown(checks)
