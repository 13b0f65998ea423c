"""The headline table (trainer/quality/report_headline.py): what the demo prints last and report.html opens
with. Its numbers come from the folder's files; here, the formatting: ratios to the teacher, "-" for what
was not measured, aligned columns."""

import math

from trainer.quality.report_headline import (
    HEADER,
    HeadlineRow,
    fd_text,
    headline_cells,
    headline_text,
    ratio_text,
)


def test_distances_and_ratios_are_rounded_and_missing_ones_are_a_dash():
    assert [fd_text(v) for v in (4.7123, 13.84, 102.4, 0.01234, 1234.6)] == [
        "4.71",
        "13.8",
        "102",
        "0.0123",
        "1235",
    ]
    # three significant digits with their trailing zeros
    assert [fd_text(v) for v in (22.96, 5.0, 99.96, 0.5, 0.0)] == ["23.0", "5.00", "100", "0.500", "0.00"]
    assert [fd_text(v) for v in (None, math.nan)] == ["-", "-"]
    assert ratio_text(4.71, 5.3) == f"{4.71 / 5.3:.2f}" == "0.89"
    assert ratio_text(8.5, 5.3) == "1.60"
    for v, teacher in ((None, 5.3), (4.7, None), (math.nan, 5.3), (4.7, math.nan), (4.7, 0.0), (4.7, -1.0)):
        assert ratio_text(v, teacher) == "-", (v, teacher)


def test_each_row_is_divided_by_the_teachers_row():
    rows = [
        HeadlineRow("teacher (stage 1)", 25, {"latent_fd": 5.0, "cls_fd": 20.0}),
        HeadlineRow("stage 2, iteration 2", 4, {"latent_fd": 4.0, "cls_fd": 30.0}),
        HeadlineRow("stage 2, one-step run, iteration 2", 1, {"latent_fd": 10.0, "cls_fd": math.nan}),
    ]
    assert headline_cells(rows) == [
        ["teacher (stage 1)", "25", "5.00", "1.00", "20.0", "1.00"],
        ["stage 2, iteration 2", "4", "4.00", "0.80", "30.0", "1.50"],
        ["stage 2, one-step run, iteration 2", "1", "10.0", "2.00", "-", "-"],  # no classifier FD
    ]


def test_without_a_teacher_or_classifier_features_the_cells_are_dashes():
    rows = [
        HeadlineRow("teacher (stage 1)", None, {"latent_fd": None, "cls_fd": None}),
        HeadlineRow("stage 2, iteration 0", None, {"latent_fd": 7.25, "cls_fd": None}),
    ]
    assert headline_cells(rows) == [
        ["teacher (stage 1)", "-", "-", "-", "-", "-"],
        ["stage 2, iteration 0", "-", "7.25", "-", "-", "-"],
    ]


def test_the_text_table_is_markdown_with_aligned_columns():
    rows = [
        HeadlineRow("teacher (stage 1)", 25, {"latent_fd": 5.31, "cls_fd": 22.5}),
        HeadlineRow("stage 2, iteration 2", 4, {"latent_fd": 4.7, "cls_fd": 13.8}),
    ]
    lines = headline_text(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert len({len(line) for line in lines}) == 1  # every column padded to one width
    assert [c.strip() for c in lines[0].strip("|").split("|")] == HEADER
    assert set(lines[1]) <= {"|", "-", " "}
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells == headline_cells(rows)
    assert lines[2].startswith("| teacher (stage 1) ") and lines[2].endswith(
        " 1.00 |"
    )  # labels left, numbers right
