"""Reports of vlpeft runs: tables and plots of task metric against trainable parameters.

- :mod:`~vlpeft.report.run_folders`: finished ``vlpeft train`` folders read as :class:`RunRow` and tabulated;
- :mod:`~vlpeft.report.demo_results`: the demo's :class:`DemoRunResult` rows, its results table (terminal and
  markdown) and its ``results.md`` page;
- :mod:`~vlpeft.report.plots`: the PNG plots of both;
- :mod:`~vlpeft.report.command`: the ``vlpeft report RUN_DIR...`` command.
"""

from vlpeft.report.command import add_parser
from vlpeft.report.demo_results import DemoRunResult
from vlpeft.report.plots import plot_metric_vs_params, plot_runs
from vlpeft.report.run_folders import RunFolderError, RunRow, markdown_table, read_run

__all__ = [
    "DemoRunResult",
    "RunFolderError",
    "RunRow",
    "add_parser",
    "markdown_table",
    "plot_metric_vs_params",
    "plot_runs",
    "read_run",
]
