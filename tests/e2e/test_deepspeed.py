"""DeepSpeed (ZeRO-2 and ZeRO-3) at 2 CPU processes for distribution matching's second engine: the fake score,
its feature head, with labels; each stopped and resumed. Moved here from test_conditional,
test_distribution_matching and test_feature_discriminator (whose config builders they use); the spec's two
models under DeepSpeed are in test_scaleout."""

import pandas as pd
import pytest
import test_distribution_matching as dm_parts
import test_feature_discriminator as head_parts
import torch
from helpers import deepspeed_launch
from test_conditional import DM, _stage2

from trainer.config.load import load_config
from trainer.stage2.feature_discriminator import new_head


def _ds_launch(config, nproc, *args, zero="deepspeed_zero2.yaml", warm=True):
    return deepspeed_launch(zero, nproc, str(config), "--device", "cpu", *args, warm=warm)


@pytest.mark.slow
def test_deepspeed_runs_the_labelled_fine_tune_and_resumes(
    tmp_path, digits_manifest, small_ae, conditional_stage1
):
    """ZeRO-2 at 2 CPU processes: the generator's engine takes the labels as a keyword, the fake score with
    its projection head is the second engine; stopped after one generator step and resumed."""
    stage2 = {**DM["stage2"], "diffusion_max_steps": 3, "metric_samples": 8, "grid_samples": 0}
    cfg = _stage2(
        tmp_path, digits_manifest, small_ae, conditional_stage1, stage2, None, DM["loss"], DM["d_config"]
    )
    # the DeepSpeed training run through the real launcher (the other DeepSpeed tests use warm ranks)
    first = _ds_launch(cfg, 2, "--stop_after_steps", "1", warm=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _ds_launch(cfg, 2, warm=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "from step 1/3" in second.stdout or "at step 1/3" in second.stdout, second.stdout[-3000:]
    out = tmp_path / "out"
    state = torch.load(out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt", weights_only=True)
    assert state["complete"] and state["conditioning"]["num_classes"] == 4
    head = torch.load(out / "discriminator_iter_0" / "discriminator_features.pt", weights_only=True)
    assert head["head_config"]["num_classes"] == 4


@pytest.mark.slow
def test_deepspeed_zero2_trains_the_fake_score_and_resumes(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    """ZeRO-2 at 2 processes: the fake score is a second engine beside the UNet's; stopped and resumed
    mid-phase, both land where the uninterrupted run does (ZeRO-3: the feature discriminator's test, whose
    second engine is the fake score with its head)."""
    zero = "deepspeed_zero2.yaml"
    pytest.importorskip("deepspeed", reason="DeepSpeed is an extra: pip install -e '.[deepspeed]'")
    for name in ("a", "b"):
        dm_parts._config(
            tmp_path / name, digits_manifest, small_ae, stage1_ckpt, loss=(dm_parts.DM, dm_parts.MSE)
        )
    proc = _ds_launch(tmp_path / "a" / "stage2.yaml", 2, zero=zero)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = _ds_launch(tmp_path / "b" / "stage2.yaml", 2, "--stop_after_steps", "1", zero=zero)
    assert first.returncode == 0 and "stopped inside iteration 0" in first.stdout, first.stderr[-3000:]
    second = _ds_launch(tmp_path / "b" / "stage2.yaml", 2, zero=zero)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "at step 1/3" in second.stdout
    out_b = tmp_path / "b" / "out"
    assert (out_b / "checkpoints" / "t2_iter_0_checkpoint_latest.fake_score.deepspeed").is_dir()
    a, b = dm_parts._latest(tmp_path / "a" / "out"), dm_parts._latest(out_b)
    fake_a = a["state"]["model"]["distribution_matching"]["fake"]
    fake_b = b["state"]["model"]["distribution_matching"]["fake"]
    stage1 = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(stage1[k], fake_a[k]) for k in stage1)  # the fake score trained
    for x, y in (
        (a["raw_state_dict"], b["raw_state_dict"]),
        (a["state_dict"], b["state_dict"]),
        (fake_a, fake_b),
    ):
        for k in x:
            assert torch.allclose(x[k], y[k], atol=1e-6), k
    history = pd.read_csv(out_b / "t2_metrics_iter_0.csv")
    assert history[["train_dm", "val_dm", "train_fake_loss"]].notna().all().all()


@pytest.mark.slow
def test_deepspeed_zero3_trains_the_head_and_resumes(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    """ZeRO-3 at 2 processes: the fake score with its head is the second engine, partitioned as the UNet is;
    stopped and resumed mid-phase, generator, fake score and head land where the uninterrupted run does.
    (ZeRO-2 runs the same second engine in test_deepspeed_zero2_trains_the_fake_score_and_resumes, without
    the head.)"""
    zero = "deepspeed_zero3.yaml"
    pytest.importorskip("deepspeed", reason="DeepSpeed is an extra: pip install -e '.[deepspeed]'")
    for name in ("a", "b"):
        head_parts._config(tmp_path / name, digits_manifest, small_ae, stage1_ckpt)
    proc = _ds_launch(tmp_path / "a" / "stage2.yaml", 2, zero=zero)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = _ds_launch(tmp_path / "b" / "stage2.yaml", 2, "--stop_after_steps", "1", zero=zero)
    assert first.returncode == 0 and "stopped inside iteration 0" in first.stdout, first.stderr[-3000:]
    second = _ds_launch(tmp_path / "b" / "stage2.yaml", 2, zero=zero)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "at step 1/3" in second.stdout
    a, b = head_parts._latest(tmp_path / "a" / "out"), head_parts._latest(tmp_path / "b" / "out")
    dm_a, dm_b = a["state"]["model"]["distribution_matching"], b["state"]["model"]["distribution_matching"]
    assert (tmp_path / "b" / "out" / "discriminator_iter_0" / "discriminator_features.pt").is_file()
    fresh = new_head(load_config(tmp_path / "a" / "stage2.yaml"), a["unet_config"]).state_dict()
    assert all(not torch.equal(fresh[k], v) for k, v in dm_a["head"].items() if v.dim() > 1)  # it trained
    for x, y in (
        (a["raw_state_dict"], b["raw_state_dict"]),
        (a["state_dict"], b["state_dict"]),
        (dm_a["fake"], dm_b["fake"]),
        (dm_a["head"], dm_b["head"]),
    ):
        for k in x:
            assert torch.allclose(x[k], y[k], atol=1e-6), k
    history = pd.read_csv(tmp_path / "b" / "out" / "t2_metrics_iter_0.csv")
    assert history[["train_adv", "val_adv", "train_d_loss", "train_d_acc"]].notna().all().all()
