"""Scale-out on CPU: DeepSpeed ZeRO-2 (2 processes; the online D a second engine beside the UNet) and ZeRO-3
(1 process) for both models, with
save, resume and DeepSpeed-free exports; and the mixed-precision switch, checked by forward dtypes (the
distribution-matching fake score and its feature head too)."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import LAUNCH_PROBE, REPO, deepspeed_launch, run_cli, stage2_config

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an extra: pip install -e '.[deepspeed]'")

DS_FLAGS = [
    "--num_samples",
    "40",
    "--discriminator_epochs",
    "2",
    "--diffusion_epochs",
    "3",
    "--device",
    "cpu",
]


def _weights(path):
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["state_dict"], blob["raw_state_dict"]


def _assert_same(a, b, atol):
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), key


def _exports_load_without_deepspeed(out):
    """In a fresh interpreter where `import deepspeed` fails, the exports still load and run."""
    code = f"""
import sys
sys.modules["deepspeed"] = None
import torch
from trainer.diffusion.checkpoints import load_diffusion_checkpoint
from trainer.stage2.discriminator_trainer import load_discriminator
ck = load_diffusion_checkpoint({str(out / "checkpoints" / "t2_iter_0_checkpoint_best.pt")!r})
x = torch.randn(2, 4, 8, 8)
assert ck.unet(x, torch.tensor([10, 20])).sample.shape == x.shape
d = load_discriminator({str(out / "discriminator_iter_0" / "discriminator_best.pt")!r})
assert d(x).shape == (2,)
print("loaded")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]


def _config(root, manifest, ae, ckpt, online: bool):
    """The DeepSpeed runs' config; online: D also trains during the fine-tune (a second engine behind a
    second Accelerator), on noise-conditioned inputs."""
    if not online:
        return stage2_config(root, manifest, ae, ckpt)
    path = stage2_config(
        root, manifest, ae, ckpt, discriminator={"mode": "online", "n_critic": 2, "noise_inputs": True}
    )
    data = yaml.safe_load(path.read_text())
    data["discriminator"]["config"]["noise_conditioned"] = True
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "config_name, nproc, online", [("deepspeed_zero2.yaml", 2, True), ("deepspeed_zero3.yaml", 1, False)]
)
def test_deepspeed_trains_both_models_and_resumes(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, config_name, nproc, online
):
    straight = _config(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt, online)
    proc = deepspeed_launch(config_name, nproc, str(straight), *DS_FLAGS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = _config(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt, online)
    first = deepspeed_launch(config_name, nproc, str(resumed), *DS_FLAGS, "--stop_after_steps", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stopped inside iteration 0" in first.stdout
    second = deepspeed_launch(config_name, nproc, str(resumed), *DS_FLAGS)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "RESUMED iteration 0, diffusion phase, from" in second.stdout and "at step 2/" in second.stdout

    out_a, out_b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    # both models were DeepSpeed engines: each phase left DeepSpeed's own per-rank checkpoint
    assert (out_b / "discriminator_iter_0" / "discriminator_state.deepspeed").is_dir()
    assert (out_b / "checkpoints" / "t2_iter_0_checkpoint_latest.deepspeed").is_dir()
    # the UNet moved away from the stage-1 weights, and D learned something
    stage1 = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    ema_b, raw_b = _weights(out_b / "checkpoints" / "t2_iter_0_checkpoint_latest.pt")
    assert any(not torch.equal(stage1[k], raw_b[k]) for k in stage1)
    # stop + resume under DeepSpeed lands where the uninterrupted run does
    ema_a, raw_a = _weights(out_a / "checkpoints" / "t2_iter_0_checkpoint_latest.pt")
    _assert_same(raw_a, raw_b, atol=1e-6)
    _assert_same(ema_a, ema_b, atol=1e-6)
    _exports_load_without_deepspeed(out_b)
    if online:  # the online D: its own engine checkpoint, trained during the fine-tune, resumed exactly
        assert (out_b / "checkpoints" / "t2_iter_0_checkpoint_latest.discriminator.deepspeed").is_dir()
        d = "discriminator_iter_0/discriminator_online.pt"
        da = torch.load(out_a / d, weights_only=True)["state_dict"]
        _assert_same(da, torch.load(out_b / d, weights_only=True)["state_dict"], atol=1e-6)
        offline = torch.load(out_a / "discriminator_iter_0" / "discriminator_best.pt", weights_only=True)
        assert any(not torch.equal(offline["state_dict"][k], da[k]) for k in da)


def _probe(tmp_path, cfg, *flags):
    out = tmp_path / "probe.json"
    env = {"ADVDIFF_PROBE_OUT": str(out)}
    proc = run_cli(LAUNCH_PROBE, "trainer.stage2", str(cfg), "--device", "cpu", *flags, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


@pytest.mark.slow
def test_mixed_precision_switch_acts(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    small = ["--num_samples", "16", "--discriminator_epochs", "1", "--diffusion_epochs", "1"]
    fp32, _ = _probe(
        tmp_path / "no",
        stage2_config(tmp_path / "no", digits_manifest, small_ae, stage1_ckpt),
        *small,
        "--mixed_precision",
        "no",
    )
    assert fp32["unet"] == ["torch.float32"] and fp32["discriminator"] == ["torch.float32"]
    bf16, _ = _probe(
        tmp_path / "bf",
        stage2_config(tmp_path / "bf", digits_manifest, small_ae, stage1_ckpt),
        *small,
        "--mixed_precision",
        "bf16",
    )
    assert "torch.bfloat16" in bf16["unet"] and "torch.bfloat16" in bf16["discriminator"]
    # the autoencoder never runs in reduced precision
    assert bf16["ae_encode"] == ["torch.float32"] and bf16["ae_decode"] == ["torch.float32"]
    out = tmp_path / "bf" / "out"
    assert (out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt").is_file()  # the bf16 run completed
    assert (
        torch.load(out / "checkpoints" / "t2_iter_0_checkpoint_best.pt", weights_only=True)["state_dict"][
            "conv_in.weight"
        ].dtype
        == torch.float32
    )


def test_mixed_precision_reaches_the_fake_score_and_its_head(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, monkeypatch
):
    """Distribution matching with the feature discriminator under bf16 (a fine-tune phase in this process):
    the fake score's head and the UNets run in bf16, the losses stay finite, and the fake score and head in
    the resume state are fp32."""
    import diffusers
    import pandas as pd
    import test_feature_discriminator as feat
    from accelerate.state import AcceleratorState

    from models.feature_discriminator import FeatureHead
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.generation import stratified_split
    from trainer.stage2.run import setup

    seen = {"head": set(), "unet": set()}
    for cls, key, pick in (
        (FeatureHead, "head", lambda o: o),
        (diffusers.UNet2DModel, "unet", lambda o: o.sample),
    ):
        original = cls.forward

        def forward(self, *args, _original=original, _key=key, _pick=pick, **kwargs):
            out = _original(self, *args, **kwargs)
            seen[_key].add(_pick(out).dtype)
            return out

        monkeypatch.setattr(cls, "forward", forward)
    cfg = feat._config(tmp_path, digits_manifest, small_ae, stage1_ckpt, diffusion_max_steps=2)
    AcceleratorState._reset_state(True)  # this process's earlier tests built an fp32 Accelerator
    try:
        s = setup(load_config(cfg), build_accelerator("cpu", "bf16"))
        torch.manual_seed(0)
        init = {"raw": s.stage1.weights, "ema": s.stage1.weights}
        split = stratified_split(24, 0.8, 0, 0, "real")
        trainer = s.finetune_trainer(0, torch.randn(24, 4, 8, 8), split, None, init)
        trainer.fit()
    finally:
        AcceleratorState._reset_state(True)  # the next test's Accelerator is its own again
    assert seen["head"] == {torch.bfloat16} and torch.bfloat16 in seen["unet"], seen
    history = pd.read_csv(trainer.history_path)
    for column in ("train_dm", "train_adv", "train_fake_loss", "train_d_loss"):
        assert history[column].notna().all() and (history[column].abs() < 1e6).all(), column
    blob = torch.load(trainer.state_path, weights_only=True)
    dm = blob["state"]["model"]["distribution_matching"]
    assert all(v.dtype == torch.float32 for part in ("fake", "head") for v in dm[part].values())


@pytest.mark.slow
def test_fp16_on_cpu_says_it_has_no_effect(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt)
    proc = run_cli(
        "-m",
        "trainer.cli",
        "stage2",
        str(cfg),
        "--device",
        "cpu",
        "--mixed_precision",
        "fp16",
        "--num_samples",
        "16",
        "--discriminator_epochs",
        "1",
        "--diffusion_epochs",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fp16 has no effect on CPU" in proc.stderr


def test_accelerate_configs_are_valid_yaml_with_comments():
    names = {p.name for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert {
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "multi_node.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "multi_cpu.yaml",
    } <= names
    for name in names:
        text = (REPO / "accelerate_configs" / name).read_text()
        data = yaml.safe_load(text)
        assert text.lstrip().startswith("#"), f"{name} has no explanatory comment"
        assert "mixed_precision" in data and "distributed_type" in data
