"""The feature discriminator (discriminator.config.type unet_features, stage2/feature_discriminator.py): a
head on the fake score's UNet bottleneck. Where its gradients go (the fake score's encoder and the head in
the fake score's update, only the generator in the generator step), a fine-tune with its columns (R1 on)
and a bit-for-bit resume, 2 processes against 1 (the offline D phase skipped), DeepSpeed ZeRO-2, and the
one-line refusals."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from helpers import finetune_alone, fit_alone, stage2_at, stage2_config

from trainer.config.load import load_config
from trainer.core.errors import UserError
from trainer.stage2.feature_discriminator import new_head
from trainer.stage2.helpers import frozen

DM = {"type": "DistributionMatchingLoss", "key": "latent", "target": None, "weight": 1.0}
ADV = {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.5}
MSE = {"type": "MSELoss", "key": "model_output", "target": "model_target", "weight": 1.0}
FEATURES = {"type": "unet_features", "head_channels": 8}


def _config(root, manifest, ae, ckpt, loss=(DM, ADV), arch=FEATURES, training=None, **stage2):
    """A tiny stage-2 config with the feature discriminator (helpers.stage2_config, then its D arch)."""
    path = stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        loss=list(loss),
        discriminator={"feature_loss_weight": 0.5, **(training or {})},
        stage2={
            "num_samples": 24,
            "diffusion_max_steps": 3,
            "diffusion_eval_interval": 3,
            "generation_steps": 2,
            "rollout_batch_size": 4,
            "val_samples": 4,
            "grid_samples": 0,
            "metric_samples": 12,
            "distribution_matching": {"n_fake": 2, "batch_size": 2},
            **stage2,
        },
    )
    data = yaml.safe_load(path.read_text())
    data["discriminator"]["config"].update(arch)
    path.write_text(yaml.safe_dump(data))
    return path


def _trainer(path):
    """The fine-tune phase of iteration 0 alone, on 24 random latents (no latent D, as run.py passes)."""
    return finetune_alone(path, d=False)


def _latest(out):
    return torch.load(out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt", weights_only=True)


# -- the head and its gradients -----------------------------------------------------------------------
def test_the_bottleneck_is_the_unets_own_mid_block_output():
    from models.feature_discriminator import unet_bottleneck
    from models.unet import build_unet, preset

    torch.manual_seed(0)
    unet = build_unet(preset("micro", sample_size=8)).eval()
    seen = []
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 990])
    with torch.no_grad():
        unet(x, t)
        mine = unet_bottleneck(unet, x, t)
    hook.remove()
    assert mine.shape == seen[0].shape and torch.equal(mine, seen[0])


def _grads(module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def test_the_head_reads_the_bottleneck_and_its_gradients_go_where_they_should(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, monkeypatch
):
    from trainer.training.losses import DiscriminatorLoss

    no_clipping = {"n_fake": 2, "batch_size": 2, "max_grad_norm": 0.0}  # clipping would scale every gradient
    cfg = _config(tmp_path, digits_manifest, small_ae, stage1_ckpt, distribution_matching=no_clipping)
    tr = _trainer(cfg)
    dm, feats = tr.helper("distribution_matching"), tr.helper("distribution_matching").features
    assert tr.critic is feats and "train_d_loss" in tr.history_fields and "train_d_acc" in tr.history_fields
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    with torch.no_grad():
        before = feats(z, t)
        up = dm.fake.up_blocks[0].resnets[0].conv1.weight
        up.add_(1.0)  # the decoder half: the logits do not read it
        assert torch.equal(feats(z, t), before)
        up.sub_(1.0)
        down = dm.fake.down_blocks[0].resnets[0].conv1.weight
        down.add_(0.1)  # the encoder half: they do
        assert not torch.allclose(feats(z, t), before)
        down.sub_(0.1)

    # the fake score's update: grads as the optimizer sees them, with and without the head's loss
    captured = []
    monkeypatch.setattr(dm.opt, "step", lambda: captured.append((_grads(dm.module), _grads(tr.unet))))
    x0, idx, parts = torch.randn(2, 4, 8, 8), [0, 1], (tr.seed, tr.stage, "fake-score", 0, 0)
    dm.update(x0, idx, parts, 1.0)
    head_loss = feats.loss
    monkeypatch.setattr(feats, "loss", lambda logits, real: (head_loss(logits, real)[0] * 0.0, {}))
    dm.update(x0, idx, parts, 1.0)
    (with_head, gen), (without_head, _) = captured
    assert all(g is None for g in gen.values())  # no generator parameter
    assert all(with_head[n] is not None and with_head[n].abs().sum() > 0 for n in with_head if "head." in n)
    assert all(without_head[n] is None or without_head[n].abs().sum() == 0 for n in with_head if "head." in n)
    encoder = [n for n in with_head if n.startswith(("unet.down_blocks", "unet.mid_block", "unet.conv_in"))]
    decoder = [n for n in with_head if n.startswith(("unet.up_blocks", "unet.conv_out"))]
    assert encoder and decoder
    assert any(not torch.equal(with_head[n], without_head[n]) for n in encoder)  # the head's gradient
    assert all(torch.equal(with_head[n], without_head[n]) for n in decoder)  # only the denoising loss's

    # the generator step: the adversarial term's gradient reaches the generator, neither the head nor the UNet
    tr.unet.zero_grad(set_to_none=True)
    dm.module.zero_grad(set_to_none=True)
    x = tr.rollouts.sample(tr.unet, [0, 1], (tr.seed, "test"))
    sample, t = tr.critic.view(x, [0, 1], tr.seed, "test-d")
    assert t is not None and sample.shape == x.shape
    term = DiscriminatorLoss(key="latent", target=None, weight=1.0)
    with frozen(tr.helpers):  # as the generator step freezes them
        term({"generated": sample, "generated_t": t}, tr.loss_context()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.unet.parameters())
    assert all(p.grad is None for p in dm.module.parameters())
    assert all(p.requires_grad for p in dm.module.parameters())  # trainable again after the step


# -- a fine-tune ----------------------------------------------------------------------------------------
def test_fine_tune_writes_its_columns_and_resumes_bit_for_bit(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    kwargs = {"loss": (DM, ADV, MSE), "training": {"r1_gamma": 0.1}}
    straight = _trainer(_config(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt, **kwargs))
    straight.fit()
    history = pd.read_csv(straight.history_path)
    for column in ("train_adv", "val_adv", "train_d_loss", "train_d_acc", "train_fake_loss", "d_val_acc"):
        assert history[column].notna().all(), column
    assert (history["train_d_loss"] > 0).all()
    a = _latest(tmp_path / "a" / "out")
    assert a["state"]["fingerprint"]["feature_discriminator"]["head_channels"] == 8
    export = torch.load(straight.critic.path, weights_only=True)
    head_a = a["state"]["model"]["distribution_matching"]["head"]
    assert export["format"] == "advdiff.feature_discriminator" and export["step"] == 3
    assert all(torch.equal(export["head"][k], v) for k, v in head_a.items())
    fresh = new_head(straight.cfg, straight.unet_config).state_dict()
    assert all(not torch.equal(fresh[k], v) for k, v in head_a.items() if v.dim() > 1)  # it trained
    # its history in the offline D's layout, beside the export: the fine-tune's head columns per validation
    d_history = pd.read_csv(straight.critic.path.parent / "discriminator_history.csv")
    assert list(d_history["step"]) == list(history["step"])
    assert d_history["train_acc"].tolist() == history["train_d_acc"].tolist()
    assert d_history["val_acc"].tolist() == history["d_val_acc"].tolist()
    # the summary's D: the exported head scores clean samples, noising each from its index alone
    from trainer.stage2.feature_discriminator import FeatureScorer

    scorer = FeatureScorer(export, straight.schedule, 0)
    z = torch.randn(4, 4, 8, 8)
    both, pair = scorer(z, index=[0, 1, 2, 3]), scorer(z[2:], index=[2, 3])
    assert both.shape == (4,) and torch.allclose(both[2:], pair, atol=1e-6)

    cfg_b = _config(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt, **kwargs)
    first = fit_alone(cfg_b, stop_after=1, d=False)
    assert first.step == 1 and not first.critic.path.is_file()  # exported when the phase ends
    resumed = fit_alone(cfg_b, d=False)
    b = _latest(tmp_path / "b" / "out")
    for key in ("state_dict", "raw_state_dict"):
        for p in a[key]:
            assert torch.equal(a[key][p], b[key][p]), (key, p)
    dm_a, dm_b = a["state"]["model"]["distribution_matching"], b["state"]["model"]["distribution_matching"]
    for part in ("fake", "head"):
        for p in dm_a[part]:
            assert torch.equal(dm_a[part][p], dm_b[part][p]), (part, p)
    for i, s in dm_a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], dm_b["optimizer"]["state"][i]["exp_avg"]), i
    assert len(dm_a["optimizer"]["param_groups"]) == 2  # the fake score's and the head's
    ha = history.drop(columns="seconds")
    hb = pd.read_csv(resumed.history_path).drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb)


def _flat(d):
    return torch.cat([d[k].double().flatten() for k in sorted(d)])


# -- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss, arch, training, message",
    [
        (
            [MSE, ADV],
            FEATURES,
            {},
            r"discriminator\.config\.type: expected latent when training\.loss has no "
            r"DistributionMatchingLoss term .*got \"unet_features\"$",
        ),
        (
            [DM, ADV],
            FEATURES,
            {"mode": "online"},
            r"discriminator\.training\.mode: expected offline when discriminator\.config\.type is "
            r"unet_features .*got \"online\"$",
        ),
        (
            [DM, ADV],
            {**FEATURES, "noise_conditioned": True},
            {"noise_inputs": True},
            r"discriminator\.training\.noise_inputs: expected false when .*got True$",
        ),
        (
            [DM, ADV],
            FEATURES,
            {"warm_start": True},
            r"discriminator\.training\.warm_start: expected false when .*got True$",
        ),
        (
            [DM, ADV],
            FEATURES,
            {"feature_t_min": 0.6, "feature_t_max": 0.4},
            r"discriminator\.training\.feature_t_max: expected a number > t_min \(0\.6\), got 0\.4$",
        ),
        (
            [DM, ADV],
            FEATURES,
            {"feature_t_min": 0.99},  # above the DM term's t_max (0.98), which it then keeps
            r"discriminator\.training\.feature_t_max: expected a number > t_min \(0\.99\), got 0\.98$",
        ),
        (
            [DM, ADV],
            {"type": "features"},
            {},
            r"discriminator\.config\.type: expected one of latent, unet_features, got \"features\"$",
        ),
        (
            [DM, ADV],
            FEATURES,
            {"feature_loss_weight": 0},
            r"discriminator\.training\.feature_loss_weight: expected a number > 0, got 0\.0$",
        ),
    ],
)
def test_bad_settings_are_one_line(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, loss, arch, training, message
):
    path = _config(tmp_path, digits_manifest, small_ae, stage1_ckpt, loss=loss, arch=arch, training=training)
    with pytest.raises(UserError, match=message) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_r1_under_deepspeed_is_refused_before_compute():
    from accelerate.utils import DistributedType

    from trainer.stage2 import check_r1_supported

    ds = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    check_r1_supported(ds, SimpleNamespace(r1_gamma=0.0))
    with pytest.raises(
        UserError, match=r"^discriminator\.training\.r1_gamma: 0\.1 needs a double backward"
    ) as e:
        check_r1_supported(ds, SimpleNamespace(r1_gamma=0.1))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_the_fake_score_and_head_carry_over_to_the_next_iteration(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capfd
):
    """stage2.distribution_matching.carry_over: true: iteration 1's fake score and head start from
    iteration 0's last weights, which track the generator iteration 1 continues from; false (the default):
    from the stage-1 EMA and a fresh head. A missing state is one line naming the file."""
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.distribution_matching import carried as carried_fake_score
    from trainer.stage2.generation import stratified_split
    from trainer.stage2.prepare import weights_of
    from trainer.stage2.run import setup

    dm = {"n_fake": 2, "batch_size": 2, "carry_over": True}
    cfg = _config(
        tmp_path, digits_manifest, small_ae, stage1_ckpt, num_iterations=2, distribution_matching=dm
    )
    proc = stage2_at(1, cfg, capfd=capfd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iteration 1: the fake score continues from iteration 0's last weights" in proc.stdout
    out = tmp_path / "out"
    last0 = out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt"
    carried, source = carried_fake_score(last0)
    assert source == last0
    s = setup(load_config(cfg), build_accelerator("cpu"))
    real, mask = torch.randn(24, 4, 8, 8), stratified_split(24, 0.8, 0, 1, "real")
    init = weights_of(last0)
    t = s.finetune_trainer(1, real, mask, None, {**init, "distribution_matching": (carried, source)})
    for name, v in t.helper("distribution_matching").fake.state_dict().items():
        assert torch.equal(v, carried["fake"][name]), name
    for name, v in t.helper("distribution_matching").module.head.state_dict().items():
        assert torch.equal(v, carried["head"][name]), name
    fresh = s.finetune_trainer(1, real, mask, None, init)  # what carry_over: false gives
    stage1 = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    assert all(
        torch.equal(v, stage1[n]) for n, v in fresh.helper("distribution_matching").fake.state_dict().items()
    )
    assert any(
        not torch.equal(v, carried["fake"][n])
        for n, v in fresh.helper("distribution_matching").fake.state_dict().items()
    )
    with pytest.raises(UserError, match=r"^.*nope\.pt: no fake score to continue from"):
        carried_fake_score(tmp_path / "nope.pt")
