"""report.html: one self-contained page per run (images embedded, no network), written by stage 2 and by
`advdiff report`, readable for finished, stopped and empty runs; and the plots it embeds."""

import base64
import contextlib
import csv
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from helpers import run_stage2, stage2_config


class Page(HTMLParser):
    """Collects every image source, link, and table row (cell texts) of a page."""

    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.rows, self.scripts = [], [], [], 0
        self._row, self._cell = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        if tag in ("a", "link"):
            self.hrefs.append(attrs.get("href", ""))
        if tag == "script":
            self.scripts += 1
        if tag == "tr":
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def assert_self_contained(text: str, page: Page):
    assert page.scripts == 0
    bare = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)  # embedded images may hold "//"
    found = re.search(r"(https?:|ftp:)?//[a-z0-9]|\burl\(|@import", bare, flags=re.I)
    assert not found, bare[max(0, found.start() - 80) : found.end() + 80]
    assert all(h.startswith("#") for h in page.hrefs), page.hrefs
    from PIL import Image

    for src in page.srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()  # every image decodes
            assert img.size[0] > 0


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def small_run(tmp_path, digits_manifest, small_ae, stage1_ckpt, iterations=1, epochs=1):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt)
    data = yaml.safe_load(cfg.read_text())
    data["stage2"].update(
        num_samples=16, val_samples=4, grid_samples=4, diffusion_epochs=epochs, num_iterations=iterations
    )
    data["discriminator"]["training"]["epochs"] = 1
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.mark.slow
def test_stage2_writes_a_self_contained_report_with_every_row(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    out = run_stage2(small_run(tmp_path, digits_manifest, small_ae, stage1_ckpt, iterations=2))
    text = (out / "report.html").read_text()
    page = parse(text)
    assert_self_contained(text, page)
    # the grids (stage 1 + 2 iterations), the summary plot, 2 D histories and 2 fine-tune curves
    assert len(page.srcs) >= 3 + 1 + 2 + 2, len(page.srcs)
    # every row of every CSV the run wrote appears as a table row, cell for cell
    csvs = sorted(out.glob("*.csv")) + sorted(out.glob("discriminator_iter_*/*.csv"))
    assert len(csvs) >= 1 + 2 + 2 + 1  # summary, 2 fine-tune, 2 D histories, timings
    for path in csvs:
        rows = csv_rows(path)
        assert len(rows) > 1, path
        for row in rows:
            assert row in page.rows, (path.name, row)
    assert "iterations finished: <b>2</b> of 2 planned" in text
    assert "experiment:" in text and "stage2:" in text  # the resolved config


@pytest.mark.slow
def test_report_of_a_run_stopped_mid_iteration(tmp_path, digits_manifest, small_ae, stage1_ckpt, capsys):
    from trainer.cli.main import main

    out = run_stage2(
        small_run(tmp_path, digits_manifest, small_ae, stage1_ckpt, epochs=3), stop_after=1
    )  # of 3 steps
    assert (out / "report.html").is_file()  # written when stage 2 started
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    text = (out / "report.html").read_text()
    page = parse(text)
    assert_self_contained(text, page)
    assert "iterations finished: <b>0</b>" in text
    assert "iteration 0 not finished (running, or stopped): fakes generated, reals encoded" in text
    assert len(page.srcs) >= 2  # the stage-1 grid and the first D history
    for row in csv_rows(out / "discriminator_iter_0" / "discriminator_history.csv"):
        assert row in page.rows


def test_report_compare_marks_the_better_run(tmp_path, capsys):
    from trainer.cli.main import main

    runs = []
    for name, fd in (("a", [40.0, 12.0]), ("b", [40.0, 20.0])):
        root = tmp_path / name
        root.mkdir()
        (root / f"{name}_summary.csv").write_text(
            "iteration,latent_fd,precision\n" + "".join(f"{k},{v},0.5\n" for k, v in enumerate(fd))
        )
        runs.append(root)
    assert main(["report", str(runs[0]), "--compare", str(runs[1])]) == 0
    text = (runs[0] / "report.html").read_text()
    page = parse(text)
    assert_self_contained(text, page)
    assert ["1", "latent_fd", "12", "20", "8", "A"] in page.rows  # lower FD is better: A
    assert "iterations finished: <b>1</b>" in text


def test_report_of_an_empty_or_missing_folder_is_one_line(tmp_path, capsys):
    from trainer.cli.main import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().startswith("advdiff: error:")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x_summary.csv").write_text("iteration,latent_fd\n0,40\n")
    assert main(["report", str(tmp_path / "run"), "--compare", str(tmp_path / "nope")]) == 2
    assert "--compare" in capsys.readouterr().err


def test_report_stays_readable_for_ten_iterations(tmp_path):
    """Ten iterations of grids and histories: every grid and every row is on the page, in order."""
    import numpy as np

    from trainer.files import atomic
    from trainer.quality.report import build_report

    root = tmp_path / "long"
    (root / "samples").mkdir(parents=True)
    atomic.save_png(np.zeros((10, 10), dtype=np.uint8), root / "samples" / "r_stage1.png")
    rows = ["iteration,latent_fd"] + [f"{k},{40 - 3 * k}" for k in range(11)]
    (root / "r_summary.csv").write_text("\n".join(rows) + "\n")
    for k in range(10):
        atomic.save_png(np.full((10, 10), 20 * k, dtype=np.uint8), root / "samples" / f"r_iter_{k}.png")
        (root / f"discriminator_iter_{k}").mkdir()
        (root / f"discriminator_iter_{k}" / "discriminator_history.csv").write_text(
            f"epoch,val_acc\n1,0.{k}\n"
        )
    text = build_report(root)
    page = parse(text)
    assert_self_contained(text, page)
    assert len(page.srcs) == 11
    assert [r for r in page.rows if r and r[0].isdigit() and len(r) == 2][:11] == [
        r.split(",") for r in rows[1:]
    ]
    captions = re.findall(r"<figcaption>(iteration \d+)", text)
    assert captions == [f"iteration {k}" for k in range(10)], captions  # in order
    assert "iterations finished: <b>10</b>" in text


@contextlib.contextmanager
def _figures_drawn():
    """The figures the plot functions draw, kept instead of saved."""
    from trainer.files import plots

    made, real_save = [], plots._save
    plots._save = lambda fig, plt_, path: made.append(fig)
    try:
        yield made
    finally:
        plots._save = real_save


def test_plots_use_whole_ticks_log_fd_and_keep_the_title_clear(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.files import plots

    with _figures_drawn() as made:
        path = tmp_path / "s_summary.csv"
        path.write_text("iteration,latent_fd,cls_fd,precision\n0,40,210,0.4\n1,12,31,0.7\n2,11,30,0.75\n")
        plots.plot_summary(path, tmp_path / "s.png")
        flat = tmp_path / "f_summary.csv"
        flat.write_text("iteration,latent_fd,precision\n0,12,0.4\n1,11,0.7\n")
        plots.plot_summary(flat, tmp_path / "f.png")
    fig, flat_fig = made
    fd, _, _ = fig.axes[:3]
    assert fd.get_yscale() == "log"  # 11 .. 210 spans more than 10x
    assert flat_fig.axes[0].get_yscale() == "linear"  # 11 .. 12 does not
    fig.canvas.draw()
    ticks = [t for t in fd.get_xticks() if fd.get_xlim()[0] <= t <= fd.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # the figure title sits above every panel title
    renderer = fig.canvas.get_renderer()
    title_box = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert title_box.y0 >= ax.title.get_window_extent(renderer).y1 - 0.5
    plt.close("all")


def test_fine_tune_plot_shows_the_distribution_matching_and_feature_d_terms_only_when_present(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from trainer.files import plots

    with _figures_drawn() as made:
        plain = tmp_path / "plain.csv"
        plain.write_text("epoch,train_loss,train_mse,val_loss\n1,0.2,0.2,0.21\n2,0.19,0.19,0.2\n")
        plots.plot_metrics(plain, tmp_path / "p.png", 0)
        dm = tmp_path / "dm.csv"
        dm.write_text(
            "epoch,train_loss,train_dm,val_dm,train_fake_loss,train_d_loss,train_d_acc\n"
            "1,0.03,0.02,0.025,0.2,1.38,0.55\n2,0.03,0.023,0.022,0.21,1.37,0.53\n"
        )
        plots.plot_metrics(dm, tmp_path / "d.png", 1)
    titles = [[ax.get_title() for ax in fig.axes] for fig in made]
    assert titles[0] == ["loss", "MSE", "adversarial", "D on samples"]
    assert titles[1] == ["loss", "MSE", "adversarial", "D on samples", "distribution matching", "feature D"]
    labels = [line.get_label() for line in made[1].axes[4].get_lines()]
    assert labels == ["train_dm", "val_dm", "train_fake_loss"]
    plt.close("all")


def _fake_run(root: Path, k: int, summary: list[tuple], teacher: tuple | None) -> None:
    """A run folder as the demo leaves it, without training: its K (stage2_run.json), its summary rows
    (iteration, latent_fd, cls_fd) and, where given, its teacher row (steps, latent_fd, cls_fd)."""
    import json

    root.mkdir(parents=True)
    (root / "stage2_run.json").write_text(json.dumps({"fields": {"stage2.generation_steps": k}}))
    (root / "digits_summary.csv").write_text(
        "iteration,latent_fd,cls_fd\n" + "".join(",".join(map(str, r)) + "\n" for r in summary)
    )
    if teacher is not None:
        steps, latent, cls = teacher
        (root / "teacher_quality.csv").write_text(
            f"steps,stage1_step,latent_fd,cls_fd\n{steps},1500,{latent},{cls}\n"
        )


def test_report_opens_with_the_teacher_this_run_and_the_one_step_companion(tmp_path):
    """The page's first table is the headline: the teacher at its steps, this run's last summary row at K,
    and the demo's one-step companion's; each FD also divided by the teacher's. The companion's own page
    shows the teacher and itself. The stage-1-at-K line stays, below it, in the status."""
    from trainer.quality.report import build_report

    root = tmp_path / "demo"
    teacher = (25, 5.31, 22.46)
    _fake_run(root, 4, [(0, 12.62, 77.1), (1, 6.05, 30.2), (2, 4.707, 13.83)], teacher)
    _fake_run(root / "one_step", 1, [(0, 101.7, 879.0), (1, 9.3, 26.4), (2, 8.46, 24.71)], teacher)

    def ratio(v, t):
        return f"{v / t:.2f}"

    text = build_report(root)
    page = parse(text)
    assert text.index('<h2 id="headline">') < text.index('<div class="status">') < text.index('id="samples"')
    assert page.rows[0] == ["", "steps", "latent FD", "÷ teacher", "classifier FD", "÷ teacher"]
    assert page.rows[1:4] == [
        ["teacher (stage 1)", "25", "5.31", "1.00", "22.5", "1.00"],
        ["stage 2, iteration 1", "4", "4.71", ratio(4.707, 5.31), "13.8", ratio(13.83, 22.46)],
        ["stage 2, one-step run, iteration 1", "1", "8.46", ratio(8.46, 5.31), "24.7", ratio(24.71, 22.46)],
    ]
    assert "stage 1 &rarr; iteration 1 (lower is better): latent FD 12.62 &rarr; <b>4.707</b>" in text
    companion = parse(build_report(root / "one_step"))
    assert companion.rows[1] == page.rows[1]  # the same teacher
    assert companion.rows[2] == ["stage 2, iteration 1", *page.rows[3][1:]]  # itself, and nothing more
    assert [r[0] for r in companion.rows if len(r) == 6 and r[0].startswith("stage 2")] == [
        companion.rows[2][0]
    ]

    (root / "teacher_quality.csv").unlink()  # a run without a teacher row: its own row, no ratios
    page = parse(build_report(root))
    assert page.rows[1] == ["teacher (stage 1)", "-", "-", "-", "-", "-"]
    assert page.rows[2] == ["stage 2, iteration 1", "4", "4.71", "-", "13.8", "-"]
