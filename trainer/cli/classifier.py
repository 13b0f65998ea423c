"""`advdiff classifier CONFIG [--out PATH]`: train the image classifier whose penultimate features back
`stage2.metric_features: classifier:PATH` (cls_fd, cls_precision, cls_recall in the quality summary).

It learns the manifest's label column on the training split (training.train_split, split_seed) and
prints its accuracy on the held-out rows, the ones the summary scores against. One CPU process, seconds
for the embedded digits."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.cli.common import run_main
from trainer.cli.flags import Parser, add_flags, add_set_flag
from trainer.core.errors import UserError
from trainer.files.layout import RunLayout
from trainer.quality import DEFAULT_EPOCHS


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="advdiff classifier", description=__doc__)
    p.add_argument("config", help="experiment YAML (its dataset section names the manifest)")
    p.add_argument(
        "--out", default=None, help="weights file to write (default <experiment.save_path>/classifier.pt)"
    )
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the training split")
    p.add_argument(
        "--label_column",
        default=None,
        metavar="COL",
        help="manifest column of integer class labels (default: dataset.label_column, else label)",
    )
    add_flags(p, ["seed"])
    add_set_flag(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p


def main(argv=None) -> int:
    from trainer.quality import train_classifier

    def body(cfg, args):
        if args.epochs < 1:
            raise UserError(f"--epochs: expected an integer >= 1, got {args.epochs}")
        out = Path(args.out) if args.out else RunLayout.of(cfg).classifier
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder; name the weights file")
        train_classifier(
            cfg,
            out,
            epochs=args.epochs,
            label_column=args.label_column or cfg.dataset.label_column or "label",
        )

    return run_main(build_parser(), argv, body)
