"""Class-conditional models: the labels (exact class frequencies, the same at any world size), stage 1 with
label dropout, and stage 2 in every D mode with labels, at 1 and 2 processes, resumed exactly."""

import numpy as np
import pytest
import torch
import yaml
from helpers import conditional_stage1_config, run_stage2, stage2_config, stop_then_resume

from trainer.config.load import load_config


# -- the labels ----------------------------------------------------------------------------------------
def test_draws_have_the_class_frequencies_exactly_and_do_not_depend_on_the_caller():
    from trainer.data.labels import apportion, draw_labels, dropped_labels, per_sample_labels

    counts = np.array([50, 30, 0, 20])
    assert apportion(10, counts).tolist() == [5, 3, 0, 2]
    assert apportion(7, counts).tolist() == [4, 2, 0, 1]  # largest remainders: 3.5, 2.1, 1.4
    y = draw_labels(37, counts, 42, "fake", 0)
    assert np.bincount(y.numpy(), minlength=4).tolist() == apportion(37, counts).tolist()
    assert torch.equal(y, draw_labels(37, counts, 42, "fake", 0))
    assert not torch.equal(y, draw_labels(37, counts, 42, "fake", 1))  # another iteration: another order
    a = per_sample_labels(range(10), counts, 1, "r")
    assert torch.equal(a[3:7], per_sample_labels(range(3, 7), counts, 1, "r"))  # per index, any split
    assert (per_sample_labels(range(400), counts, 1, "r") != 2).all()  # an empty class is never drawn
    dropped = dropped_labels(torch.zeros(2000, dtype=torch.long), range(2000), 0.25, 9, 1, "d")
    assert 0.2 < float((dropped == 9).float().mean()) < 0.3
    assert (dropped_labels(torch.zeros(5, dtype=torch.long), range(5), 0.0, 9, 1, "d") == 0).all()


def test_class_names_and_one_line_for_an_unknown_or_missing_label():
    from trainer.core.errors import UserError
    from trainer.data.labels import class_names_of, label_indices

    assert class_names_of([3, "1", 0.0]) == ["0", "1", "2", "3"]  # integers keep their meaning
    assert class_names_of(["cat", "dog", "cat"]) == ["cat", "dog"]
    assert label_indices(["dog", "cat"], ["cat", "dog"], "m.csv").tolist() == [1, 0]
    assert label_indices([2.0, "0"], ["0", "1", "2"], "m.csv").tolist() == [2, 0]
    with pytest.raises(UserError, match=r"^m.csv: row 1: label 'cow' is not one of the model's 2 classes"):
        label_indices(["dog", "cow"], ["cat", "dog"], "m.csv")
    with pytest.raises(UserError, match=r"^m.csv: row 0: no label"):
        label_indices([float("nan")], ["cat"], "m.csv")


def test_an_image_folder_labels_by_its_sub_folders(tmp_path):
    from PIL import Image

    from trainer.data.manifest import read_manifest

    for name in ("cat/a.png", "cat/b.png", "dog/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / name)
    rows = read_manifest(tmp_path, "image_path", label_column="label")
    assert rows["label"].tolist() == ["cat", "cat", "dog"]


# -- stage 1 -------------------------------------------------------------------------------------------
def test_stage1_records_its_classes_and_exports_a_conditional_pipeline(conditional_stage1):
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    ck = load_diffusion_checkpoint(conditional_stage1)
    assert ck.conditioning.class_names == ("0", "1", "2", "3") and ck.conditioning.null_class == 4
    assert ck.unet_config["num_class_embeds"] == 5 and ck.conditioning.guidable()
    folder = load_diffusion_checkpoint(conditional_stage1.parent / "pipeline")
    assert folder.conditioning == ck.conditioning


def test_stage1_refuses_labels_that_do_not_fit(tmp_path, digits_manifest, small_ae):
    from trainer.core.errors import ConfigError, UserError
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    path = conditional_stage1_config(tmp_path, digits_manifest, small_ae, num_class_embeds=3)
    with pytest.raises(
        UserError, match=r"column 'label' has 4 classes \(labels 0..3\); unet.num_class_embeds is 3"
    ):
        DiffusionTrainer(load_config(path), build_accelerator("cpu"))
    data = yaml.safe_load(path.read_text())
    del data["unet"]["num_class_embeds"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"unet.num_class_embeds: expected the number of classes"):
        DiffusionTrainer(load_config(path), build_accelerator("cpu"))


# -- stage 2 -------------------------------------------------------------------------------------------
# distribution matching with the feature discriminator (a projection head on the fake score's bottleneck)
DM = {
    "loss": [
        {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 0.25},
        {"type": "DistributionMatchingLoss", "key": "latent", "target": None, "weight": 1.0},
        {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.5},
    ],
    "stage2": {
        "rollout_batch_size": 4,
        "distribution_matching": {"n_fake": 2, "batch_size": 4, "warm_start_steps": 2},
    },
    "d_config": {"type": "unet_features", "head_channels": 8},
}


def _stage2(root, manifest, ae, ckpt, stage2=None, discriminator=None, loss=None, d_config=None):
    path = stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        stage2={"guidance_scale": 2.0, "diffusion_max_steps": 2, **(stage2 or {})},
        discriminator=discriminator,
        loss=loss,
    )
    data = yaml.safe_load(path.read_text())
    data["dataset"].update(label_column="label", filters={"label": [0, 1, 2, 3]})
    data["discriminator"]["config"].update(conditional=True, **(d_config or {}))
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param({}, id="rollout-offline"),
        pytest.param({"stage2": {"generator_loss_mode": "x0_pred"}}, id="x0_pred"),
        pytest.param({"discriminator": {"mode": "online"}}, id="rollout-online"),
        pytest.param(DM, id="distribution-matching-feature-head"),
    ],
)
def test_a_stopped_fine_tune_resumes_exactly_in_every_mode(
    mode, tmp_path, digits_manifest, small_ae, conditional_stage1
):
    small = {"diffusion_max_steps": 4, "diffusion_eval_interval": 2, "metric_samples": 8, "grid_samples": 0}
    args = dict(stage2={**small, **mode.get("stage2", {})})
    discriminator = {"epochs": 1, **(mode.get("discriminator") or {})}
    args.update(discriminator=discriminator, loss=mode.get("loss"), d_config=mode.get("d_config"))
    straight = run_stage2(_stage2(tmp_path / "a", digits_manifest, small_ae, conditional_stage1, **args))
    cfg_b = _stage2(tmp_path / "b", digits_manifest, small_ae, conditional_stage1, **args)
    _, resumed = stop_then_resume(cfg_b, 3)
    name = "checkpoints/t2_iter_0_checkpoint_latest.pt"
    a, b = (torch.load(x / name, weights_only=True) for x in (straight, resumed))
    for key in ("state_dict", "raw_state_dict"):
        for param in a[key]:
            assert torch.equal(a[key][param], b[key][param]), (key, param)
    assert a["conditioning"]["class_names"] == ["0", "1", "2", "3"]
    if mode is DM:
        head = torch.load(straight / "discriminator_iter_0" / "discriminator_features.pt", weights_only=True)
        assert head["head_config"]["num_classes"] == 4  # the projection head
        return
    d = torch.load(straight / "discriminator_iter_0" / "discriminator_best.pt", weights_only=True)
    assert d["config"]["num_classes"] == 4  # the projection D


@pytest.mark.slow
def test_conditional_demo_end_to_end_small(tmp_path, capfd):
    """`advdiff demo --conditional` (shrunk): the labelled chain, a conditional result with its class record,
    the class columns in the summary; and the plain demo refuses its folder in one line."""
    import pandas as pd
    from helpers import cli, run_cli
    from test_stage0_demo import SMALL_DEMO

    out = tmp_path / "demo"
    small = [*SMALL_DEMO, "--set", "stage2.generation_steps=1", "--set", "stage2.num_iterations=1"]
    proc = run_cli("-m", "trainer.cli", "demo", "--conditional", "--out", str(out), "--device", "cpu", *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(out / "config.yaml")
    assert cfg.dataset.label_column == "label" and cfg.unet.num_class_embeds == 10
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    result = load_diffusion_checkpoint(out / "pipeline")
    assert result.conditioning.class_names == tuple(str(i) for i in range(10))
    summary = pd.read_csv(out / "digits_conditional_summary.csv")
    assert summary[["class_fd", "label_fidelity", "guidance_scale"]].notna().all().all()
    assert ((summary["label_fidelity"] >= 0) & (summary["label_fidelity"] <= 1)).all()
    again = cli(capfd, "demo", "--out", out, "--device", "cpu", *small)  # in this process
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1] == (
        f"advdiff: error: --out {out}: holds the conditional demo (config.yaml); give the plain demo its "
        "own --out"
    )
