"""`advdiff report RUN_DIR [--compare OTHER_RUN]`: write RUN_DIR/report.html, one self-contained page (images
embedded, no network, no script) with the run's sample grids, quality summary, D and fine-tune histories,
time by phase and config; with --compare, another run's summary beside it, the better value marked.

Stage 2 writes the page itself when it starts and after every iteration; this command writes it for any
run folder, finished, running or stopped."""

from __future__ import annotations

from pathlib import Path

from trainer.cli.common import one_line_errors
from trainer.cli.flags import Parser
from trainer.core.errors import UserError


def build_parser() -> Parser:
    p = Parser(prog="advdiff report", description=__doc__)
    p.add_argument("run", help="run folder (experiment.save_path)")
    p.add_argument("--compare", default=None, metavar="PATH", help="another run folder to show beside it")
    p.add_argument("--out", default=None, metavar="PATH", help="the page to write (default RUN/report.html)")
    return p


def report(args) -> None:
    from trainer.files import atomic
    from trainer.files.layout import RunLayout
    from trainer.quality import build_report

    run = Path(args.run)
    if not run.is_dir():
        raise UserError(f"{run}: not a folder (advdiff report takes a run folder, experiment.save_path)")
    if args.compare is not None and not Path(args.compare).is_dir():
        raise UserError(f"--compare {args.compare}: not a folder (expected another run folder)")
    if RunLayout.name_in(run) is None and not any(run.iterdir()):
        raise UserError(f"{run}: empty folder; nothing to report")
    out = Path(args.out) if args.out else run / "report.html"
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; expected the path of the page")
    path = atomic.write_text(build_report(run, compare=args.compare), out)
    print(f"advdiff report: {path}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return one_line_errors(lambda: report(args))
