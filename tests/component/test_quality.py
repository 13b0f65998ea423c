"""Issue: show that stage 2 helps. The control arm and `compare`, the adaptive weight, pictures
with and without matplotlib, and TensorBoard tracking."""

import subprocess
import sys

import pandas as pd
import pytest
from helpers import REPO, run_cli, stage2_config

SMALL = ["--num_samples", "24", "--discriminator_epochs", "1", "--diffusion_epochs", "2", "--device", "cpu"]


@pytest.mark.slow
def test_control_arm_and_compare(tmp_path, digits_manifest, small_ae, stage1_ckpt, capfd):
    """Also, on the first run: progress bars (forced on without a terminal) and TensorBoard logging."""
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt)
    tb = ["--report_to", "tensorboard"] if _has("tensorboard") else []
    a = run_cli("-m", "trainer.cli", "stage2", str(cfg), *SMALL, *tb, env={"ADVDIFF_PROGRESS": "1"})
    assert a.returncode == 0, a.stderr[-2000:]
    for desc in ("fakes 0", "encoding", "stage2_d0", "stage2_g0"):  # bars with their throughput
        assert desc in a.stderr, desc
    assert "sample/s" in a.stderr and "step/s" in a.stderr
    if tb:
        _check_tensorboard(tmp_path / "out")
    from trainer.cli.main import main

    assert main(["stage2", str(cfg), *SMALL, "--control"]) == 0  # the control arm in this process
    run, control = tmp_path / "out", tmp_path / "out_control"
    ma = pd.read_csv(run / "t2_metrics_iter_0.csv")
    mb = pd.read_csv(control / "t2_metrics_iter_0.csv")
    assert (mb["adv_weight"] == 0).all() and (mb["train_adv"] == 0).all()  # no adversarial term at all
    assert (ma["adv_weight"] > 0).all() and (ma["train_adv"] > 0).all()
    assert ma["step"].tolist() == mb["step"].tolist()  # the same steps
    import torch

    same_data = torch.equal(
        torch.load(run / "discriminator_iter_0" / "real_latents.pt"),
        torch.load(control / "discriminator_iter_0" / "real_latents.pt"),
    )
    assert same_data
    sa, sb = pd.read_csv(run / "t2_summary.csv"), pd.read_csv(control / "t2_summary.csv")
    assert sa.loc[0, "latent_fd"] == sb.loc[0, "latent_fd"]  # the same stage-1 baseline
    capfd.readouterr()
    assert main(["compare", str(run), str(control)]) == 0
    out = capfd.readouterr().out
    assert "latent_fd" in out and "   1  latent_fd" in out
    assert main(["compare", str(run), str(tmp_path / "nowhere")]) == 2
    assert capfd.readouterr().err.startswith("advdiff: error: ")


@pytest.mark.slow
def test_adaptive_weight_moves_with_d_accuracy(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    # a band no accuracy can sit above forces the weight up at every validation
    cfg = stage2_config(
        tmp_path,
        digits_manifest,
        small_ae,
        stage1_ckpt,
        stage2={"adaptive_weight": True, "adaptive_band": [0.0, 0.0001], "adaptive_factor": 2.0},
    )
    from trainer.cli.main import main

    assert main(["stage2", str(cfg), *SMALL]) == 0
    m = pd.read_csv(tmp_path / "out" / "t2_metrics_iter_0.csv")
    assert m["adv_weight"].tolist() == pytest.approx([0.1, 0.2])  # logged before each update


def test_plots_skip_with_one_warning_without_matplotlib(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("iteration,latent_fd,precision,recall\n0,5,0.8,0.8\n1,4,0.8,0.9\n")
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from trainer.files import plots\n"
        f"plots.plot_summary({str(csv)!r}, {str(tmp_path / 'a.png')!r})\n"
        f"plots.plot_summary({str(csv)!r}, {str(tmp_path / 'b.png')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("matplotlib is not installed") == 1
    assert not (tmp_path / "a.png").exists()


def test_summary_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.files import plots

    csv = tmp_path / "s.csv"
    csv.write_text("iteration,latent_fd,precision,recall\n0,5,0.8,0.8\n1,4,0.8,0.9\n")
    plots.plot_summary(csv, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check_tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tracking").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for ev in events:
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    for expected in ("stage2_d0/val_acc", "stage2_g0/val_mse", "stage2_g0/d_prob_fake", "summary/latent_fd"):
        assert expected in tags, sorted(tags)
    assert any("samples" in t for t in tags), sorted(tags)
