"""``vlpeft report RUN_DIR...``: a markdown table across runs and a plot of task metric vs trainable parameters;
``vlpeft report --papers RESULTS_JSON``: a demo's differences between methods beside the papers'
(:mod:`vlpeft.report.paper_deltas`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlpeft.report.paper_deltas import claims_report
from vlpeft.report.plots import plot_runs
from vlpeft.report.run_folders import RunFolderError, markdown_table, read_run
from vlpeft.training.checkpoints import atomic_write_text

__all__ = ["add_parser"]


def _run_report(args: argparse.Namespace) -> int:
    if (args.papers is None) == (not args.runs):
        raise RunFolderError("give run folders or --papers RESULTS_JSON (one of the two)")
    if args.papers is not None:
        markdown = claims_report(args.papers)
        if args.output:
            atomic_write_text(Path(args.output), markdown)
        print(markdown, end="")
        return 0
    rows = [read_run(folder) for folder in args.runs]
    table = markdown_table(rows)
    if args.output:
        Path(args.output).write_text(table)
    print(table, end="")
    if args.plot:
        if not any(r.value is not None for r in rows):
            raise RunFolderError("no run has a metric value to plot (pass --plot '' to skip the plot)")
        plot_runs(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``report``."""
    parser = subparsers.add_parser("report", help="markdown table + metric-vs-parameters plot across runs")
    parser.add_argument("runs", nargs="*", help="run folders written by `vlpeft train`")
    parser.add_argument("--papers", metavar="RESULTS_JSON",
                        help="instead of run folders: a demo's results.json; prints its differences between methods "
                             "beside the differences the p-adapter and routing papers report")
    parser.add_argument("--output", help="also write the markdown table to this file")
    parser.add_argument("--plot", default="report.png", help="PNG plot path (default report.png; '' to skip)")
    parser.set_defaults(handler=_run_report)
