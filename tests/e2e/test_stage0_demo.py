"""Stage 0 (autoencoder) resume, the embedded demo chain (and its headline), and one-line errors for bad
inputs."""

import math

import pytest
import torch
import yaml
from helpers import cli, run_cli

from trainer.config.load import load_config


def _ae_config(tmp_path, manifest):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = {
        "experiment": {"save_path": str(tmp_path / "out")},
        "dataset": {"manifest": str(manifest), "filters": {"label": [7]}},
        "autoencoder": {
            "model": {"block_out_channels": [8, 8], "norm_num_groups": 4},
            "training": {
                "max_steps": 6,
                "batch_size": 8,
                "eval_interval": 3,
                "log_interval": 1,
                "warmup_steps": 1,
            },
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train_ae(path, stop_after=None):
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage0.autoencoder_trainer import AutoencoderTrainer

    cfg = load_config(path)
    t = AutoencoderTrainer(cfg, build_accelerator("cpu"))
    t.stop_after = stop_after
    t.fit()
    return cfg.out_dir / "stage0"


def test_stage0_resume_and_exports(tmp_path, digits_manifest):
    from models.autoencoder import config_scaling, load_autoencoder

    a = _train_ae(_ae_config(tmp_path / "a", digits_manifest))
    cfg_b = _ae_config(tmp_path / "b", digits_manifest)
    b = _train_ae(cfg_b, stop_after=4)
    stale = b / ".autoencoder_latest.pt.tmp.4242"  # what a kill in the middle of an atomic write leaves
    stale.write_bytes(b"half a checkpoint")
    b = _train_ae(cfg_b)
    assert not stale.exists()
    wa = torch.load(a / "autoencoder_latest.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "autoencoder_latest.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ae = load_autoencoder(a / "autoencoder")  # diffusers folder with measured latent scaling
    s = config_scaling(ae)
    assert s.scale > 0 and s.scale != 1.0


SMALL_DEMO = [
    "--set",
    "autoencoder.training.max_steps=4",
    "--set",
    "autoencoder.training.eval_interval=2",
    "--set",
    "training.max_steps=6",
    "--set",
    "training.eval_interval=3",
    "--set",
    "training.sample_steps=3",
    "--set",
    "stage2.num_samples=24",
    "--set",
    "stage2.generation_steps=2",
    "--set",
    "stage2.diffusion_epochs=1",
    "--set",
    "stage2.num_iterations=2",
    "--set",
    "stage2.rollout_batch_size=8",
    "--set",
    "stage2.distribution_matching.n_fake=2",
    "--set",
    "discriminator.training.epochs=1",
    "--set",
    "discriminator.training.batch_size=8",
    "--set",
    "training.batch_size=8",
    "--set",
    "stage2.val_samples=4",
    "--set",
    "stage2.grid_samples=4",
    "--set",
    "stage2.metric_samples=32",
    "--set",
    "unet.preset=micro",
]


@pytest.mark.slow
def test_demo_chain_small(tmp_path, capfd):
    out = tmp_path / "demo"
    proc = run_cli("-m", "trainer.cli", "demo", "--out", str(out), "--device", "cpu", *SMALL_DEMO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in (
        "data/manifest.csv",
        "stage0/autoencoder/config.json",
        "stage1/checkpoint_best.pt",
        "stage1/samples.png",
        "config.yaml",
        "samples/digits_iter_0.png",
        "samples/digits_iter_1.png",
        "samples/digits_stage1.png",
        "samples/digits_comparison.png",
        "checkpoints/digits_iter_1_checkpoint_latest.pt",
        "discriminator_iter_1/fake_latents.pt",
        "digits_metrics_iter_1.csv",
        "classifier.pt",
        "reference_cls.npz",
        "one_step/checkpoints/digits_iter_1_checkpoint_latest.pt",  # the companion run at K = 1
        "one_step/digits_summary.csv",
        "one_step/report.html",
    ):
        assert (out / rel).is_file(), rel
    import json

    from PIL import Image

    # the comparison: stage 1 and the one-step run at 1 step, stage 1 and stage 2 at K = 2, stage 1 at 3
    captions = json.loads((out / "samples/digits_comparison.json").read_text())
    assert captions == [
        "stage 1 at 1 step",
        "stage 2 (1-step run) at 1 step",
        "stage 1 at 2 steps",
        "stage 2 at 2 steps",
        "stage 1 at 3 steps",
    ]
    panel = Image.open(out / "samples/digits_stage1.png").size[0]  # one grid of the same seeds
    assert Image.open(out / "samples/digits_comparison.png").size[0] == 5 * panel + 4 * 12
    assert " | ".join(captions) in (out / "report.html").read_text()
    fields = json.loads((out / "one_step" / "stage2_run.json").read_text())["fields"]
    assert fields["stage2.generation_steps"] == 1 and fields["stage2.rollout_grad_steps"] == 1
    import pandas as pd

    summary = pd.read_csv(out / "digits_summary.csv")  # the demo's classifier features: cls_* columns
    assert summary[["cls_fd", "cls_precision", "cls_recall", "cls_fd_lo", "cls_fd_hi"]].notna().all().all()
    assert "held-out accuracy" in proc.stdout
    cfg = load_config(out / "config.yaml")  # the config of every stage, stage 2 included
    assert cfg.resolve_path(cfg.diffusion.stage1_checkpoint).is_file()
    assert cfg.resolve_path(cfg.autoencoder.checkpoint).is_dir()
    table = check_headline(out, proc.stdout)
    check_teacher_is_measured_as_evaluate_does(out, capfd)
    # a rerun skips finished work, and reuses the teacher row
    stamp = (out / "teacher_quality.csv").stat().st_mtime_ns
    again = cli(capfd, "demo", "--out", out, "--device", "cpu", *SMALL_DEMO)  # in this process
    assert again.returncode == 0, again.stderr[-3000:]
    # stage 0, stage 1, stage-2 iterations 0 and 1, and the one-step run's iterations 0 and 1
    assert again.stdout.count("already complete") == 6
    assert "teacher at 3 steps: " in again.stdout and "already there; reusing it" in again.stdout
    assert (out / "teacher_quality.csv").stat().st_mtime_ns == stamp
    assert printed_headline(again.stdout) == table


def printed_headline(stdout: str) -> list[list[str]]:
    """The cells of the headline table the demo prints as its last lines (header and rule dropped)."""
    lines = stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Against the teacher"))
    table = lines[start + 1 :]  # nothing after the table
    assert all(line.startswith("| ") and line.endswith(" |") for line in table), table
    cells = [[c.strip() for c in line[1:-1].split("|")] for line in table]
    assert cells[0] == ["", "steps", "latent FD", "÷ teacher", "classifier FD", "÷ teacher"]
    return cells[2:]


def _same(printed: str, value: float) -> bool:
    """A printed distance (3 significant digits) against the CSV's value."""
    return math.isclose(float(printed), value, rel_tol=6e-3)


def check_headline(out, stdout: str) -> list[list[str]]:
    """The printed headline: the teacher row (stage 1 at training.sample_steps = 3) from
    teacher_quality.csv, stage 2 at K = 2 from the last row of the summary, the one-step run from the last
    row of its summary, each with its ratio to the teacher; report.html opens with the same table."""
    import pandas as pd

    teacher = pd.read_csv(out / "teacher_quality.csv")
    assert len(teacher) == 1 and teacher["steps"][0] == 3
    sources = [
        ("teacher (stage 1)", 3, teacher.iloc[0]),
        ("stage 2, iteration 1", 2, pd.read_csv(out / "digits_summary.csv").iloc[-1]),
        ("stage 2, one-step run, iteration 1", 1, pd.read_csv(out / "one_step/digits_summary.csv").iloc[-1]),
    ]
    assert [int(row["iteration"]) for _, _, row in sources[1:]] == [2, 2]  # each run's last iteration
    rows = printed_headline(stdout)
    assert [r[:2] for r in rows] == [[label, str(k)] for label, k, _ in sources]
    for cells, (label, _, row) in zip(rows, sources, strict=True):
        for at, col in ((2, "latent_fd"), (4, "cls_fd")):
            assert _same(cells[at], row[col]), (label, col, cells[at], row[col])
            ratio = row[col] / teacher[col][0]
            assert math.isclose(float(cells[at + 1]), ratio, abs_tol=0.006), (
                label,
                col,
                cells[at + 1],
                ratio,
            )
    # the stage-2 rows are not the teacher's: a table of one model's numbers three times fails above
    assert len({r[2] for r in rows}) == 3
    page = (out / "report.html").read_text()
    first = page.index('<h2 id="headline">')
    assert first < page.index('<div class="status">')
    for cells in rows:
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in page[first:], cells
    companion = (out / "one_step/report.html").read_text()
    for cells in (rows[0], ["stage 2, iteration 1", *rows[2][1:]]):  # the teacher and itself
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in companion, cells
    assert (out / "one_step/teacher_quality.csv").read_text() == (out / "teacher_quality.csv").read_text()
    return rows


def check_teacher_is_measured_as_evaluate_does(out, capfd) -> None:
    """The teacher row equals `advdiff evaluate --generation_steps 3` of the stage-1 model on the demo's
    config: the summary's metric samples, seeds, held-out reals and feature spaces."""
    import json

    import pandas as pd

    path = out.parent / "teacher_evaluate.json"  # beside the run: evaluate writes nothing into it
    flags = ("--device", "cpu", *SMALL_DEMO, "--generation_steps", "3", "--json", path)
    done = cli(capfd, "evaluate", out / "config.yaml", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(path.read_text())
    teacher = pd.read_csv(out / "teacher_quality.csv").iloc[0]
    for col in ("latent_fd", "cls_fd", "precision", "recall", "pixel_fd", "samples"):
        assert math.isclose(teacher[col], row[col], rel_tol=1e-5), (col, teacher[col], row[col])


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("advdiff: warning")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_missing_inputs_are_one_line_errors(tmp_path, digits_manifest, small_ae, capfd):
    from helpers import tiny_config

    cfg = tiny_config(tmp_path, tmp_path / "nope.csv", small_ae)
    line = _one_line_error(cli(capfd, "stage1", cfg, "--device", "cpu"))
    assert line == f"advdiff: error: {tmp_path / 'nope.csv'}: manifest not found"

    cfg = tiny_config(tmp_path, digits_manifest, tmp_path / "no_ae")
    line = _one_line_error(cli(capfd, "stage1", cfg, "--device", "cpu"))
    assert line == f"advdiff: error: autoencoder.checkpoint: {tmp_path / 'no_ae'}: autoencoder not found"

    data = yaml.safe_load(tiny_config(tmp_path, digits_manifest, small_ae).read_text())
    data["unet"] = {"preset": "micro", "in_channels": 16}
    cfg.write_text(yaml.safe_dump(data))
    line = _one_line_error(cli(capfd, "stage1", cfg, "--device", "cpu"))
    assert (
        line
        == f"advdiff: error: {cfg}: unet.in_channels: expected 4 (the autoencoder's latent channels), got 16"
    )
