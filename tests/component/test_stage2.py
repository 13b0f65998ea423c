"""Stage 2: the documented command line and output layout, sharding at 1 and 2 processes, the adversarial
gradient in both modes, loud resume, and resume equivalence of the diffusion phase."""

import numpy as np
import pytest
import torch
from helpers import (
    files_under,
    finetune_alone,
    run_cli,
    run_stage2,
    spec_layout,
    stage2_config,
    stop_then_resume,
)

from trainer.config.load import load_config

SPEC_FLAGS = [
    "--num_samples",
    "20",
    "--num_iterations",
    "2",
    "--discriminator_epochs",
    "2",
    "--diffusion_epochs",
    "2",
    "--generation_batch_size",
    "8",
    "--generation_steps",
    "3",
    "--device",
    "cpu",
    "--seed",
    "42",
    "--start_iteration",
    "0",
]


def extras(name: str, iterations: int) -> set:
    """Files beyond the documented layout: the best D, D's resume state, the per-iteration sample grid (and
    the stage-1 model's, sampled the same way), the quality summary, the record of the config fields the run
    started with, the time by phase, the result as a pipeline folder, and the run's report page."""
    paths = {
        f"{name}_summary.csv",
        f"{name}_summary.png",
        "stage2_run.json",
        "timings.csv",
        f"samples/{name}_stage1.png",
        "reference_latent.npz",
        "reference_pixel.npz",
    }  # held-out reals' statistics
    paths |= {"report.html"}  # the run's one page
    # the result as a diffusers pipeline folder
    paths |= {
        f"pipeline/{f}"
        for f in (
            "model_index.json",
            "pipeline.py",
            "advdiff.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        )
    }
    paths |= {f"{name}_metrics_iter_{k}.png" for k in range(iterations)}
    paths |= {f"discriminator_iter_{k}/discriminator_history.png" for k in range(iterations)}
    for k in range(iterations):
        paths |= {
            f"discriminator_iter_{k}/discriminator_best.pt",
            f"discriminator_iter_{k}/discriminator_state.pt",
            f"samples/{name}_iter_{k}.png",
        }
    return paths


@pytest.mark.slow
def test_command_line_gives_the_documented_layout(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt)
    proc = run_cli("-m", "trainer.cli", "stage2", str(cfg), *SPEC_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    found = files_under(out)
    assert spec_layout("t2", 2) <= found, spec_layout("t2", 2) - found
    assert found == spec_layout("t2", 2) | extras("t2", 2), found - spec_layout("t2", 2)
    # every flag acted
    assert torch.load(out / "discriminator_iter_1" / "fake_latents.pt").shape == (20, 4, 8, 8)
    import pandas as pd

    d_hist = pd.read_csv(out / "discriminator_iter_0" / "discriminator_history.csv")
    assert list(d_hist.columns) == [
        "epoch",
        "step",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "val_real_acc",
        "val_fake_acc",
        "lr",
        "seconds",
        "nonfinite_skipped",
    ]
    assert d_hist["epoch"].iloc[-1] == 2 and (d_hist["nonfinite_skipped"] == 0).all()
    metrics = pd.read_csv(out / "t2_metrics_iter_1.csv")
    assert list(metrics.columns) == [
        "epoch",
        "step",
        "train_loss",
        "train_mse",
        "train_adv",
        "val_loss",
        "val_mse",
        "val_adv",
        "d_prob_fake",
        "lr",
        "seconds",
        "d_val_acc",
        "adv_weight",
        "nonfinite_skipped",
    ]
    assert (metrics["nonfinite_skipped"] == 0).all()
    assert len(metrics) == 2 and metrics["epoch"].tolist() == [1, 2]
    assert "DDIM" in proc.stdout and "3 DDIM steps" in proc.stdout
    summary = pd.read_csv(out / "t2_summary.csv")
    assert summary["iteration"].tolist() == [0, 1, 2]  # stage 1, then one row per iteration
    assert summary[["latent_fd", "precision", "recall", "pixel_fd", "d_acc"]].notna().all().all()
    ck = torch.load(out / "checkpoints" / "t2_iter_1_checkpoint_latest.pt", weights_only=True)
    assert ck["iteration"] == 1 and ck["complete"] and "optimizer" in ck["state"]["model"]
    best = torch.load(out / "checkpoints" / "t2_iter_1_checkpoint_best.pt", weights_only=True)
    assert best["format"] == "advdiff.diffusion" and "state" not in best


@pytest.mark.slow
def test_fakes_do_not_depend_on_batch_size(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    a = run_stage2(
        stage2_config(
            tmp_path / "a",
            digits_manifest,
            small_ae,
            stage1_ckpt,
            stage2={"generation_batch_size": 5, "diffusion_max_steps": 1},
        )
    )
    b = run_stage2(
        stage2_config(
            tmp_path / "b",
            digits_manifest,
            small_ae,
            stage1_ckpt,
            stage2={"generation_batch_size": 24, "diffusion_max_steps": 1},
        )
    )
    fa = torch.load(a / "discriminator_iter_0" / "fake_latents.pt")
    fb = torch.load(b / "discriminator_iter_0" / "fake_latents.pt")
    assert torch.allclose(fa, fb, atol=1e-5)


def test_x0_pred_mode_end_to_end(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    import pandas as pd

    cfg = stage2_config(
        tmp_path,
        digits_manifest,
        small_ae,
        stage1_ckpt,
        stage2={"generator_loss_mode": "x0_pred", "x0_pred_max_timestep": 0.5},
        loss=[
            {"type": "MSELoss", "key": "model_output", "target": "model_target", "weight": 1.0},
            {"type": "DiscriminatorLoss", "key": "pred_latent", "target": None, "weight": 0.5},
        ],
        discriminator={"loss": "hinge", "r1_gamma": 0.5},
    )
    text = cfg.read_text().replace("num_layers: 2", "num_layers: 2\n    noise_conditioned: true")
    cfg.write_text(text)
    out = run_stage2(cfg)
    m = pd.read_csv(out / "t2_metrics_iter_0.csv")
    assert np.isfinite(m[["val_loss", "val_mse", "val_adv", "d_prob_fake", "train_adv"]].to_numpy()).all()
    d = pd.read_csv(out / "discriminator_iter_0" / "discriminator_history.csv")
    assert np.isfinite(d["val_loss"]).all()


def test_validation_split_holds_both_classes():
    from trainer.stage2.generation import stratified_split

    for n in (2, 3, 37, 1000):
        for label in ("real", "fake"):
            train = stratified_split(n, 0.8, 42, 0, label)
            assert train.any() and (~train).any()
    a, b = stratified_split(100, 0.8, 42, 0, "real"), stratified_split(100, 0.8, 42, 0, "real")
    assert (a == b).all() and not a[:80].all()  # fixed seed, shuffled (not the first 80)


def _finetune_trainer(tmp_path, manifest, ae, ckpt, mode, adv_weight, loss_kind="bce", conditioned=False):
    """A FinetuneTrainer on a few real latents with a fresh D, without running the phases."""
    loss = [
        {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 1.0},
        {
            "type": "DiscriminatorLoss",
            "key": "latent" if mode == "rollout" else "pred_latent",
            "target": None,
            "weight": adv_weight,
        },
    ]
    cfg = load_config(
        stage2_config(
            tmp_path,
            manifest,
            ae,
            ckpt,
            stage2={"generator_loss_mode": mode, "rollout_grad_steps": 2},
            loss=loss,
            discriminator={"loss": loss_kind},
        )
    )
    cfg.discriminator.config.noise_conditioned = conditioned
    return finetune_alone(cfg, return_d=True)


@pytest.mark.parametrize(
    "mode, kind, conditioned",
    [
        ("rollout", "bce", False),
        ("x0_pred", "bce", True),
        ("rollout", "hinge", True),
        ("x0_pred", "non_saturating", False),
    ],
)
def test_adversarial_term_has_gradient_wrt_unet(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, mode, kind, conditioned
):
    from trainer.training.composite import CompositeLoss
    from trainer.training.losses import DiscriminatorLoss

    trainer, d = _finetune_trainer(
        tmp_path, digits_manifest, small_ae, stage1_ckpt, mode, 1.0, kind, conditioned
    )
    # keep only the adversarial term: its gradient alone must reach the UNet's parameters
    trainer.loss = CompositeLoss([t for t in trainer.loss.terms if isinstance(t, DiscriminatorLoss)])
    loss, parts, _ = trainer.compute_loss(0)
    assert parts["adv"] > 0 or kind == "hinge"
    loss.backward()
    grads = [p.grad for p in trainer.unet.parameters()]
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert total > 0, "the adversarial term carries no gradient to the UNet"
    assert all(p.grad is None for p in d.parameters()), "D must stay frozen in the generator step"


def test_zero_weight_adversarial_term_is_left_out(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    for mode in ("rollout", "x0_pred"):
        trainer, d = _finetune_trainer(tmp_path / mode, digits_manifest, small_ae, stage1_ckpt, mode, 0.0)
        assert not trainer.loss.needs_discriminator
        calls = []
        d.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        forwards = []
        trainer.unet.register_forward_hook(lambda m, i, o, seen=forwards: seen.append(i[0].shape[0]))
        loss, parts, n = trainer.compute_loss(0)
        assert calls == [] and parts["adv"] == 0.0
        assert forwards == [n], "no rollout: one UNet forward over the MSE batch alone"


def test_start_iteration_without_checkpoint_fails_loudly(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt, stage2={"num_iterations": 3})
    proc = run_cli("-m", "trainer.cli", "stage2", str(cfg), "--start_iteration", "2", "--device", "cpu")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    missing = tmp_path / "out" / "checkpoints" / "t2_iter_1_checkpoint_latest.pt"
    assert proc.stderr.strip() == (
        f"advdiff: error: --start_iteration 2: {missing} is missing; finish iteration 1 "
        f"first (or drop --start_iteration to continue where the last run stopped)"
    )
    assert not (tmp_path / "out" / "discriminator_iter_2").exists()  # nothing was started from stage 1


@pytest.mark.slow
def test_diffusion_phase_resume_is_exact(tmp_path, digits_manifest, small_ae, stage1_ckpt, capsys):
    import pandas as pd

    kw = dict(stage2={"num_samples": 40, "diffusion_epochs": 3})
    straight = run_stage2(stage2_config(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt, **kw))
    cfg_b = stage2_config(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt, **kw)
    # 4 steps per epoch: stops inside epoch 1
    _, resumed = stop_then_resume(cfg_b, 3, between=capsys.readouterr)
    log = capsys.readouterr().out
    assert "reusing saved latents" in log and "already complete" in log  # latents and D not redone
    assert "RESUMED iteration 0, diffusion phase, from" in log and "at step 3/12" in log
    assert "RESUMING" in log and "fake_latents.pt saved, real_latents.pt saved" in log
    name = "checkpoints/t2_iter_0_checkpoint_latest.pt"
    a = torch.load(straight / name, weights_only=True)
    b = torch.load(resumed / name, weights_only=True)
    for key in ("state_dict", "raw_state_dict"):
        for p in a[key]:
            assert torch.equal(a[key][p], b[key][p]), (key, p)
    ma = pd.read_csv(straight / "t2_metrics_iter_0.csv").drop(columns="seconds")
    mb = pd.read_csv(resumed / "t2_metrics_iter_0.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ma, mb)


def test_reals_need_enough_rows(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt, stage2={"num_samples": 5000})
    proc = run_cli("-m", "trainer.cli", "stage2", str(cfg), "--device", "cpu")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "advdiff: error: --num_samples 5000 exceeds the 1797 manifest rows left after "
        "filters; lower it, or set stage2.sample_with_replacement: true"
    )


def test_real_rows_are_drawn_without_replacement():
    from trainer.stage2.generation import choose_real_rows

    rows = choose_real_rows(100, 100, 42, 0, replace=False)
    assert sorted(rows) == list(range(100))
    assert not np.array_equal(
        choose_real_rows(100, 10, 42, 0, False), choose_real_rows(100, 10, 42, 1, False)
    )
