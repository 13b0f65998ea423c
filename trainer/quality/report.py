"""One self-contained page per run, `report.html`: whether stage 2 helped, and everything behind it.

Images are embedded (data URIs), styles inline, no script and no network: the page can be mailed or copied
off a cluster and opened anywhere. It shows what exists, so it renders for a run with no finished iteration
(the stage-1 grid, the first D history so far), for one killed mid-iteration, and for long runs (grids wrap,
tables scroll):

    headline      the teacher (stage 1 at full steps, teacher_quality.csv), this run's latest row at its K
                  and a demo companion's (one_step/), each FD also divided by the teacher's
                  (report_headline.py, the table `advdiff demo` prints last)
    status        iterations finished of planned, what the unfinished one has so far, and stage 1 at K
                  against the latest iteration
    samples       the grids, stage 1 first, then each iteration (the same seeds), and the few-step comparison
    quality       the summary's plot and every row; with --compare, the other run's rows beside, better marked
    iterations    each iteration's D history and fine-tune curves (pictures, and every CSV row)
    time          timings.csv by phase, with totals
    config        the resolved config

Stage 2 writes it (main process, atomically) when it starts and after every iteration;
`advdiff report RUN_DIR [--compare OTHER]` writes it for any run folder. What it reads and compares is in
report_data.py, the HTML of each section in report_sections.py.
"""

from __future__ import annotations

from pathlib import Path

from trainer.files import atomic
from trainer.files.layout import RunLayout
from trainer.files.read import read_csv_rows
from trainer.quality.report_data import COLUMNS, compare_rows, csv_table, fmt, read_config
from trainer.quality.report_sections import (
    config_section,
    iterations_section,
    page_head,
    quality_section,
    samples_section,
    time_section,
)

__all__ = ["COLUMNS", "build_report", "compare_rows", "csv_table", "fmt", "read_config", "write_report"]


def build_report(root, config: dict | None = None, compare=None, name: str | None = None) -> str:
    """The page's HTML for the run folder `root` (what exists so far). `config`: the resolved config (read
    from the folder when not given); `compare`: another run folder shown beside it."""
    root = Path(root)
    name = name or RunLayout.name_in(root) or "advdiff"
    layout = RunLayout(root, name)
    config = config if config is not None else read_config(layout)
    ks = layout.iterations_in()
    summary_rows = read_csv_rows(layout.summary)
    finished = sorted({int(r["iteration"]) - 1 for r in summary_rows if r.get("iteration", 0) >= 1})
    out = page_head(layout, config, ks, finished, summary_rows, compare is not None)
    out += samples_section(layout, config, ks, summary_rows)
    out += quality_section(layout, compare)
    out += iterations_section(layout, ks, finished)
    out += time_section(layout)
    out += config_section(config)
    out.append("</body></html>")
    return "\n".join(out)


def write_report(root, config: dict | None = None, compare=None, name: str | None = None) -> Path:
    """Write `root/report.html` atomically; returns its path."""
    layout = RunLayout(Path(root), name or "")
    page = build_report(root, config=config, compare=compare, name=name)
    return atomic.write_text(page, layout.report)
