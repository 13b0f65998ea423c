"""Stage 2 at 2 CPU processes (gloo, DDP) against 1: every draw is per sample index or per batch, so 2
processes make the 1-process run up to the all-reduce's summation order; only the main process writes.
Moved here from the component files of each part (test_stage2, test_distribution_matching,
test_feature_discriminator, test_conditional, test_nonfinite, test_diffusers_io), whose config builders
they use."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import test_distribution_matching as dm_parts
import test_feature_discriminator as head_parts
import torch
import yaml
from helpers import LAUNCH_PROBE, accelerate_launch, stage2_at, stage2_config
from test_conditional import DM, _stage2
from test_diffusers_io import ATTN_UNET, assert_portable, custom_betas, our_images, write_pipeline_folder
from test_nonfinite import SMALL, _finite

from trainer.core.faults import INJECT_NAN_ENV


@pytest.mark.slow
def test_two_processes_match_one_and_only_main_writes(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    runs = {}
    for nproc in (1, 2):
        root = tmp_path / f"p{nproc}"
        # R1 and two back-propagated rollout steps exercise the less common DDP paths too
        cfg = stage2_config(
            root,
            digits_manifest,
            small_ae,
            stage1_ckpt,
            stage2={"num_samples": 37, "diffusion_max_steps": 2, "rollout_grad_steps": 2},
            discriminator={"r1_gamma": 1.0},
        )
        audit = root / "audit"
        audit.mkdir()
        proc = accelerate_launch(
            nproc,
            LAUNCH_PROBE,
            "trainer.stage2",
            str(cfg),
            "--device",
            "cpu",
            env={"ADVDIFF_AUDIT_DIR": str(audit), "ADVDIFF_AUDIT_WATCH": str(root / "out")},
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[nproc] = (root / "out", audit, proc)
    out2, audit2, proc2 = runs[2]
    assert (audit2 / "rank1.txt").read_text() == "", "a non-main process wrote files"
    assert any("fake_latents.pt" in line for line in (audit2 / "rank0.txt").read_text().splitlines())
    assert proc2.stdout.count("generating 37 fakes") == 1  # logs from the main process only
    f1 = torch.load(runs[1][0] / "discriminator_iter_0" / "fake_latents.pt")
    f2 = torch.load(out2 / "discriminator_iter_0" / "fake_latents.pt")
    r1 = torch.load(runs[1][0] / "discriminator_iter_0" / "real_latents.pt")
    r2 = torch.load(out2 / "discriminator_iter_0" / "real_latents.pt")
    assert f2.shape == (37, 4, 8, 8) and r2.shape == (37, 4, 8, 8)
    assert torch.unique(f2.flatten(1), dim=0).shape[0] == 37  # 37 distinct fakes, no padding duplicates
    assert torch.allclose(f1, f2, atol=1e-5)
    assert torch.allclose(r1, r2, atol=1e-5)


@pytest.mark.slow
def test_distribution_matching_at_two_processes_matches_one(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capfd
):
    """Only the DM term: every draw of the fine-tune (the fake score's warm start on the saved fakes
    and the rollouts' step counts included) is per sample index or per batch, so 2 processes make the
    1-process update up to the all-reduce's summation order."""
    runs = {}
    dm = {"n_fake": 2, "batch_size": 2, "warm_start_steps": 2}  # the warm start on the saved fakes too
    for nproc in (1, 2):
        # train_steps: each rollout batch draws its K (from its seed parts: alike on every rank)
        cfg = dm_parts._config(
            tmp_path / f"p{nproc}",
            digits_manifest,
            small_ae,
            stage1_ckpt,
            distribution_matching=dm,
            train_steps=[1, 2],
        )
        proc = stage2_at(nproc, cfg, capfd=capfd)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "fake score warm start: 2 updates on the saved fakes" in proc.stdout + proc.stderr
        blob = dm_parts._latest(tmp_path / f"p{nproc}" / "out")
        runs[nproc] = (blob["raw_state_dict"], blob["state"]["model"]["distribution_matching"]["fake"])
    start = torch.load(stage1_ckpt, weights_only=True)["state_dict"]

    def flat(d):
        return torch.cat([d[k].double().flatten() for k in sorted(d)])

    for which in (0, 1):  # the generator, the fake score: apart by far less than they moved
        one, two, w0 = flat(runs[1][which]), flat(runs[2][which]), flat(start)
        assert float((one - two).norm() / (one - w0).norm()) <= 1e-3, which


@pytest.mark.slow
def test_feature_head_at_two_processes_matches_one(tmp_path, digits_manifest, small_ae, stage1_ckpt, capfd):
    """DM and the adversarial term only (the MSE batch is drawn per rank): every draw of the fake score's
    updates, the head's reals included, is per sample slot, so 2 processes match 1 up to summation order.
    The whole stage: no offline D phase, a summary row without D columns."""
    runs = {}
    for nproc in (1, 2):
        cfg = head_parts._config(tmp_path / f"p{nproc}", digits_manifest, small_ae, stage1_ckpt)
        proc = stage2_at(nproc, cfg, capfd=capfd)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "no offline discriminator phase" in proc.stdout
        out = tmp_path / f"p{nproc}" / "out"
        assert not (out / "discriminator_iter_0" / "discriminator_best.pt").exists()
        assert (out / "discriminator_iter_0" / "discriminator_features.pt").is_file()
        summary = pd.read_csv(out / "t2_summary.csv")
        assert len(summary) == 2 and summary["latent_fd"].notna().all()
        blob = head_parts._latest(out)
        dm = blob["state"]["model"]["distribution_matching"]
        runs[nproc] = (blob["raw_state_dict"], dm["fake"], dm["head"])
    start = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    for which in (0, 1):  # the generator, the fake score: apart by far less than they moved
        one, two, w0 = (
            head_parts._flat(runs[1][which]),
            head_parts._flat(runs[2][which]),
            head_parts._flat(start),
        )
        assert float((one - two).norm() / (one - w0).norm()) <= 1e-3, which
    one, two = head_parts._flat(runs[1][2]), head_parts._flat(runs[2][2])
    assert float((one - two).norm() / one.norm()) <= 1e-3  # the head (fresh, so relative to its size)


@pytest.mark.slow
def test_the_lean_step_at_two_processes_matches_one(tmp_path, digits_manifest, small_ae, stage1_ckpt, capfd):
    """The demo's recipe at K > 1 with the feature head: backward simulation (the stop step drawn per
    batch, alike on every rank), the last fake-score update on the generator step's own samples (each rank
    its own slots) and no real batch: 2 processes match 1 up to summation order."""
    runs = {}
    lean = {"backward_simulation": True, "rollout_grad_steps": 1, "generation_steps": 3}
    dm = {"n_fake": 2, "batch_size": None, "reuse_generator_samples": True}
    for nproc in (1, 2):
        root = tmp_path / f"p{nproc}"
        cfg = head_parts._config(
            root, digits_manifest, small_ae, stage1_ckpt, distribution_matching=dm, **lean
        )
        proc = stage2_at(nproc, cfg, capfd=capfd)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        blob = head_parts._latest(root / "out")
        assert blob["state"]["fingerprint"]["backward_simulation"] is True
        dm_state = blob["state"]["model"]["distribution_matching"]
        runs[nproc] = (blob["raw_state_dict"], dm_state["fake"], dm_state["head"])
    start = head_parts._flat(torch.load(stage1_ckpt, weights_only=True)["state_dict"])
    for which in (0, 1):  # the generator, the fake score: apart by far less than they moved
        one, two = head_parts._flat(runs[1][which]), head_parts._flat(runs[2][which])
        assert float((one - two).norm() / (one - start).norm()) <= 1e-3, which
    one, two = head_parts._flat(runs[1][2]), head_parts._flat(runs[2][2])
    assert float((one - two).norm() / one.norm()) <= 1e-3


@pytest.mark.slow
def test_two_processes_draw_the_same_labels_and_fakes_as_one_and_resume(
    tmp_path, digits_manifest, small_ae, conditional_stage1, capfd
):
    import pandas as pd

    outs = {}
    for nproc in (1, 2):  # distribution matching with a projection feature head: every label path at 2
        stage2 = {**DM["stage2"], "num_samples": 37, "metric_samples": 8}
        root = tmp_path / f"p{nproc}"
        loss = DM["loss"][1:]  # no MSE term: its batch draws are per rank, every other draw per sample
        cfg = _stage2(root, digits_manifest, small_ae, conditional_stage1, stage2, None, loss, DM["d_config"])
        if nproc == 2:  # stopped inside the fine-tune, then resumed: at 2 processes too
            proc = accelerate_launch(
                2, "-m", "trainer.stage2", str(cfg), "--device", "cpu", "--stop_after_steps", "1"
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert (root / "out" / "checkpoints" / "t2_iter_0_checkpoint_latest.pt").is_file()
        proc = stage2_at(nproc, cfg, capfd=capfd)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs[nproc] = tmp_path / f"p{nproc}" / "out" / "discriminator_iter_0"
    for name in ("fake_labels.pt", "real_labels.pt"):
        assert torch.equal(torch.load(outs[1] / name), torch.load(outs[2] / name)), name
    fakes = [torch.load(outs[n] / "fake_latents.pt") for n in (1, 2)]
    assert torch.allclose(*fakes, atol=1e-5)
    # the fakes' labels have the data's class frequencies exactly
    rows = pd.read_csv(digits_manifest)
    counts = np.bincount(rows[rows["label"].isin([0, 1, 2, 3])]["label"], minlength=4)
    y = torch.load(outs[2] / "fake_labels.pt").numpy()
    share = counts / counts.sum() * 37
    assert (np.abs(np.bincount(y, minlength=4) - share) < 1).all() and len(y) == 37
    summary = pd.read_csv(tmp_path / "p2" / "out" / "t2_summary.csv")
    assert (summary["guidance_scale"] == 2.0).all()
    head = torch.load(outs[2] / "discriminator_features.pt", weights_only=True)
    assert head["head_config"]["num_classes"] == 4 and "class_embed.weight" in head["head"]
    states = [torch.load(outs[n].parent / "checkpoints" / "t2_iter_0_checkpoint_latest.pt") for n in (1, 2)]
    start = torch.load(conditional_stage1, weights_only=True)["state_dict"]

    def flat(d):
        return torch.cat([d[k].double().flatten() for k in sorted(d)])

    # the same fine-tune up to the all-reduce's summation order: apart by far less than the weights moved
    one, two = (flat(s["raw_state_dict"]) for s in states)
    assert float((one - two).norm() / (one - flat(start)).norm()) <= 1e-3


@pytest.mark.slow
def test_stage2_nan_on_one_rank_is_skipped_on_both(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt, **SMALL)
    # rank 1 only; a hang (ranks disagreeing about the step) would hit the timeout
    proc = accelerate_launch(
        2,
        "-m",
        "trainer.stage2",
        str(cfg),
        "--device",
        "cpu",
        env={INJECT_NAN_ENV: "stage2_d0:2:1;stage2_g0:3:1"},
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the logs and CSVs come from rank 0: its counters show it skipped the steps rank 1 could not take
    assert "[stage2_d0" in proc.stdout and "step 2/3: non-finite loss on rank 1; step skipped" in proc.stdout
    assert "step 3/4: non-finite loss on rank 1; step skipped" in proc.stdout
    out = tmp_path / "out"
    assert (
        pd.read_csv(out / "discriminator_iter_0" / "discriminator_history.csv")["nonfinite_skipped"].iloc[-1]
        == 1
    )
    assert pd.read_csv(out / "t2_metrics_iter_0.csv")["nonfinite_skipped"].tolist() == [0, 1]
    assert _finite(torch.load(out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt", weights_only=True))


@pytest.mark.slow
def test_diffusers_pipeline_in_stage2_at_two_processes_and_out(tmp_path, digits_manifest):
    """The issue's must-show: a diffusers UNet2DModel with attention at two levels, a custom-beta
    DDPMScheduler
    and a VAE (scale and shift) saved as a pipeline folder; stage 2 at 2 processes fine-tunes it; its result
    opens with DiffusionPipeline.from_pretrained and samples what advdiff's own sampler samples."""
    from diffusers import DiffusionPipeline

    src = write_pipeline_folder(tmp_path / "their_pipeline")
    cfg_path = stage2_config(tmp_path, digits_manifest, src / "vae", src)
    data = yaml.safe_load(cfg_path.read_text())
    data["autoencoder"] = {"checkpoint": None}  # the pipeline's vae/ serves
    data["stage2"].update(num_samples=16, val_samples=4, grid_samples=4, diffusion_epochs=1)
    data["discriminator"]["training"]["epochs"] = 1
    cfg_path.write_text(yaml.safe_dump(data))
    proc = accelerate_launch(2, "-m", "trainer.stage2", str(cfg_path), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    exported = out / "pipeline"
    assert_portable(exported)
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "AdvdiffLatentPipeline"]
    unet_cfg = json.loads((exported / "unet" / "config.json").read_text())
    assert unet_cfg["down_block_types"] == list(ATTN_UNET["down_block_types"])
    sched = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert sched["trained_betas"] == pytest.approx(custom_betas())
    vae_cfg = json.loads((exported / "vae" / "config.json").read_text())
    assert (vae_cfg["scaling_factor"], vae_cfg["shift_factor"]) == pytest.approx((0.9, 0.05))

    pipe = DiffusionPipeline.from_pretrained(str(exported), trust_remote_code=True)
    assert type(pipe).__name__ == "AdvdiffLatentPipeline"
    steps = pipe.config.sampling_steps
    assert steps == 3  # the stage-2 generation steps the weights were fine-tuned for
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    got = pipe(latents=noise, output_type="pt").images
    want, ck = our_images(out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt", noise, steps)
    assert Path(ck.autoencoder).resolve() == (src / "vae").resolve()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # stage 2 changed the weights it exported
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    start = load_diffusion_checkpoint(src)
    assert any(not torch.equal(start.weights[k], ck.weights[k]) for k in start.weights)
