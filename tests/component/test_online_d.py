"""The online discriminator (`discriminator.training.mode: online`): D keeps training during the fine-tune,
sees noise-conditioned inputs with their t, is frozen during the generator step, and its state resumes
exactly, in one process, under DDP at 2 processes and under DeepSpeed ZeRO-2 at 2 processes."""

import pandas as pd
import pytest
import torch
from helpers import stage2_config

from trainer.config.load import load_config

ONLINE = {"mode": "online", "n_critic": 2, "noise_inputs": True, "r1_gamma": 0.1, "max_steps": 3}
NOISE_D = {"noise_conditioned": True}


def online_config(root, manifest, ae, ckpt, r1_gamma=None, **stage2):
    path = stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        stage2={
            "num_samples": 24,
            "diffusion_max_steps": 4,
            "diffusion_eval_interval": 2,
            "grid_samples": 0,
            "metric_samples": 12,
            **stage2,
        },
        discriminator={**ONLINE, **({} if r1_gamma is None else {"r1_gamma": r1_gamma})},
    )
    import yaml

    data = yaml.safe_load(path.read_text())
    data["discriminator"]["config"].update(NOISE_D)
    path.write_text(yaml.safe_dump(data))
    return path


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_close(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol), k


def test_online_d_trains_during_the_fine_tune_and_always_gets_t(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, monkeypatch
):
    from models.discriminator import LatentDiscriminator
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import finetune_trainer
    from trainer.stage2.run import run

    calls = []  # (phase, t) of every D forward during the fine-tune
    forward = LatentDiscriminator.forward

    def spy(self, z, timesteps=None, class_labels=None):
        if phase["now"] == "finetune":
            calls.append(
                (
                    torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()),
                    None if timesteps is None else timesteps.detach().clone(),
                    z.requires_grad,
                )
            )
        return forward(self, z, timesteps, class_labels)

    phase = {"now": "other"}
    fit = finetune_trainer.FinetuneTrainer.fit

    def fit_spy(self):
        phase["now"] = "finetune"
        try:
            return fit(self)
        finally:
            phase["now"] = "other"

    from diffusers import UNet2DModel

    checkpointing = []
    enable = UNet2DModel.enable_gradient_checkpointing

    def enable_spy(self, *a, **kw):
        checkpointing.append(self)
        return enable(self, *a, **kw)

    monkeypatch.setattr(LatentDiscriminator, "forward", spy)
    monkeypatch.setattr(finetune_trainer.FinetuneTrainer, "fit", fit_spy)
    monkeypatch.setattr(UNet2DModel, "enable_gradient_checkpointing", enable_spy)
    cfg = load_config(
        online_config(
            tmp_path,
            digits_manifest,
            small_ae,
            stage1_ckpt,
            gradient_checkpointing=True,
            rollout_grad_steps=3,
            grad_ratio_weight=True,
            grad_ratio_max=50.0,
        )
    )
    run(cfg, build_accelerator("cpu"))
    # the switch reached the fine-tuned UNet, and the rollout back-propagated through all K = 3 steps with it
    assert len(checkpointing) == 1 and checkpointing[0].is_gradient_checkpointing
    out = tmp_path / "out"
    it = out / "discriminator_iter_0"
    offline = _state(it / "discriminator_best.pt")["state_dict"]
    online = _state(it / "discriminator_online.pt")
    assert online["mode"] == "online" and online["step"] == 4
    # D's weights changed during the fine-tune: it was updated online, not frozen at the offline best
    assert any(not torch.equal(offline[k], online["state_dict"][k]) for k in offline)
    history = pd.read_csv(out / "t2_metrics_iter_0.csv")
    assert {"train_d_loss", "train_d_acc"} <= set(history.columns) and history["train_d_loss"].notna().all()
    # the gradient-norm-ratio weight acted at every step and is logged
    ratio = history["train_adv_ratio"]
    assert ratio.notna().all() and (ratio > 0).all() and (ratio <= 50.0).all()

    training = [c for c in calls if c[0]]  # D steps: D trainable
    generator = [c for c in calls if not c[0] and c[2]]  # generator loss: D frozen, gradient to the sample
    assert training and generator
    # 4 generator steps x n_critic 2 D steps; every training and generator-loss forward got per-sample t
    assert len(training) == 8 and len(generator) == 4
    for _, t, _ in training + generator:
        assert t is not None and t.dtype == torch.long and (t > 0).any() and (t < 500).all()
    # the summary row of iteration 1 is scored by the online D
    assert pd.read_csv(out / "t2_summary.csv")["d_acc"].notna().all()
    # exports record the sampler they were fine-tuned for
    best = _state(out / "checkpoints" / "t2_iter_0_checkpoint_best.pt")
    assert best["sampling"] == {"sampler": "ddim", "steps": 3, "eta": 0.0}


def test_gradient_checkpointing_gives_the_same_gradients():
    from models.unet import build_unet, preset

    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        unet = build_unet(preset("micro", in_channels=4, out_channels=4, sample_size=8))
        if on:
            unet.enable_gradient_checkpointing()
        unet.train()
        x = torch.randn(2, 4, 8, 8)
        for t in (700, 300):  # two chained denoising calls, as a 2-step rollout
            x = x - 0.1 * unet(x, torch.tensor([t, t])).sample
        x.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_noise_inputs_need_a_noise_conditioned_d(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    from trainer.core.errors import UserError

    path = stage2_config(
        tmp_path, digits_manifest, small_ae, stage1_ckpt, discriminator={"noise_inputs": True}
    )
    with pytest.raises(
        UserError, match=r"discriminator\.config\.noise_conditioned.*true when training.noise_inputs"
    ):
        load_config(path)
    path = stage2_config(
        tmp_path,
        digits_manifest,
        small_ae,
        stage1_ckpt,
        stage2={"generator_loss_mode": "x0_pred"},
        discriminator={"mode": "online"},
    )
    with pytest.raises(
        UserError, match=r"discriminator\.training\.mode.*offline when stage2.generator_loss_mode"
    ):
        load_config(path)


def test_r1_is_refused_under_deepspeed_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from trainer.core.errors import UserError
    from trainer.stage2.discriminator_trainer import check_r1_supported

    td = SimpleNamespace(r1_gamma=0.1)
    check_r1_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), td)  # DDP: fine
    with pytest.raises(UserError, match=r"^discriminator\.training\.r1_gamma: 0\.1 needs a double backward"):
        check_r1_supported(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), td)
    check_r1_supported(
        SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), SimpleNamespace(r1_gamma=0.0)
    )


# Online D at 2 processes: under DDP, tests/e2e/test_faults.py (its run is online: SIGKILLs inside the online
# phase, bit-identical outputs after resuming); under DeepSpeed ZeRO-2, tests/e2e/test_scaleout.py.


def test_grad_norm_ratio_gives_the_adversarial_term_the_anchors_gradient_scale():
    from trainer.training.losses import grad_norm_ratio

    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    anchor = (x @ w.T).pow(2).mean()
    adversarial = -(x @ w.T).mean()
    (ga,) = torch.autograd.grad(anchor, w, retain_graph=True)
    (gd,) = torch.autograd.grad(adversarial, w, retain_graph=True)
    ratio = grad_norm_ratio(anchor, adversarial, w, max_ratio=1e6)
    assert ratio == pytest.approx(float(ga.norm() / gd.norm()), rel=1e-5)
    # a term 10x stronger gets a 10x smaller factor; the clamp caps it; the graphs survive for the backward
    assert grad_norm_ratio(anchor, 10 * adversarial, w, 1e6) == pytest.approx(float(ratio) / 10, rel=1e-5)
    assert float(grad_norm_ratio(anchor, 1e-9 * adversarial, w, max_ratio=3.0)) == 3.0
    (anchor + ratio * adversarial).backward()
    assert w.grad is not None and not ratio.requires_grad
