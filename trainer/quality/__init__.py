"""Sample quality, used by every stage, the CLI and bench/: the fixed-seed evaluation, FD / precision /
recall maths, feature spaces and the digit classifier, and the one-page run report."""

from trainer.quality.classifier import DEFAULT_EPOCHS, train_classifier
from trainer.quality.evaluation import SUMMARY_FIELDS, Evaluator
from trainer.quality.feature_spaces import check_metric_features, load_space
from trainer.quality.feature_spaces import parse as parse_metric_features
from trainer.quality.metrics import Moments, bootstrap_fd, fd_from_moments, features, precision_recall
from trainer.quality.report import COLUMNS, build_report, compare_rows, fmt, write_report
from trainer.quality.report_headline import headline_rows, headline_text

__all__ = [
    "COLUMNS",
    "DEFAULT_EPOCHS",
    "SUMMARY_FIELDS",
    "Evaluator",
    "Moments",
    "bootstrap_fd",
    "build_report",
    "check_metric_features",
    "compare_rows",
    "fd_from_moments",
    "features",
    "fmt",
    "headline_rows",
    "headline_text",
    "load_space",
    "parse_metric_features",
    "precision_recall",
    "train_classifier",
    "write_report",
]
