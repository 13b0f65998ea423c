"""The distribution-matching generator signal (DistributionMatchingLoss,
trainer/stage2/distribution_matching.py): its maths against exact Gaussian scores, a fine-tune with it
alone (no MSE term) end to end with its history columns, exact resume of the fake score, 2 processes
against 1, DeepSpeed ZeRO-2 at 2 processes, the refusals, and the MSE term kept off the sampler's own
timesteps (stage2.mse_skip_sampler_timesteps)."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import finetune_alone, fit_alone, stage2_config, stop_then_resume

from trainer.config.load import load_config
from trainer.core.errors import UserError
from trainer.diffusion.schedule import Schedule
from trainer.stage2.distribution_matching import score_predictions
from trainer.training.losses import distribution_matching_loss

DM = {"type": "DistributionMatchingLoss", "key": "latent", "target": None, "weight": 1.0}
MSE = {"type": "MSELoss", "key": "model_output", "target": "model_target", "weight": 1.0}


# -- the maths, against exact scores --------------------------------------------------------------------
class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of N(mu, s^2 I) under `schedule`, answering in its prediction type:
    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu), a = sqrt(alphabar_t),
    b = sqrt(1 - alphabar_t)."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x_t, t):
        ab = self.schedule.train.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        x_t = x_t.double()
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + b**2) * (x_t - a * self.mu)
        eps = (x_t - a * x0) / b
        out = a * eps - b * x0 if self.schedule.prediction_type == "v_prediction" else eps
        return SimpleNamespace(sample=out.float())


def _dm_gradient(schedule, mu_real, mu_fake, x, t, noise):
    """The gradient of the mean DM loss w.r.t. the samples x, the trainer's functions end to end."""
    x = x.clone().requires_grad_(True)
    x_t = schedule.add_noise(x.detach(), noise, t)
    real, fake = GaussianDenoiser(schedule, mu_real, 0.5), GaussianDenoiser(schedule, mu_fake, 0.5)
    p_real, p_fake = score_predictions(schedule, real, fake, x_t, t)
    distribution_matching_loss(x, p_real, p_fake).mean().backward()
    return x.grad


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_gradient_points_toward_the_teacher_and_vanishes_when_matched(prediction_type):
    schedule = Schedule("linear", 1000, prediction_type)
    g = torch.Generator().manual_seed(0)
    n, shape = 64, (4, 8, 8)
    mu_real = torch.randn(shape, generator=g)
    shift = 0.3 * torch.randn(shape, generator=g)
    mu_gen = mu_real + shift
    x = mu_gen + 0.5 * torch.randn((n, *shape), generator=g)  # the generator's samples, N(mu_gen, s^2 I)
    t = torch.randint(20, 980, (n,), generator=g)
    noise = torch.randn((n, *shape), generator=g)

    # the generator's score is the fake score here: the step -grad moves every sample toward mu_real
    grad = _dm_gradient(schedule, mu_real, mu_gen, x, t, noise)
    along = (-grad.flatten(1) * shift.flatten()).sum(1)
    assert (along < 0).all() and float(along.mean()) < 0
    # exactly: p_fake - p_real = shift b^2 / (a^2 s^2 + b^2), over w, per element of the batch's mean
    ab = schedule.train.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t = schedule.add_noise(x, noise, t).double()
    p_real = mu_real + ab.sqrt() * 0.25 / (ab * 0.25 + 1 - ab) * (x_t - ab.sqrt() * mu_real)
    w = (x.double() - p_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = shift * (1 - ab) / (ab * 0.25 + 1 - ab) / w / (shift.numel() * n)
    assert torch.allclose(grad.double(), expected, rtol=1e-3, atol=1e-9)

    # matched distributions: no signal
    same = _dm_gradient(schedule, mu_real, mu_real.clone(), x, t, noise)
    assert float(same.abs().max()) < 1e-7
    # the value is 0.5 mean g^2: zero when matched, positive otherwise
    p = torch.zeros(2, *shape)
    assert float(distribution_matching_loss(p, p, p).sum()) == 0.0


# -- a fine-tune with the term ----------------------------------------------------------------------------
def _config(root, manifest, ae, ckpt, loss=(DM,), **stage2):
    return stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        loss=list(loss),
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


def _latest(out):
    return torch.load(out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt", weights_only=True)


def test_dm_alone_fine_tunes_and_resumes_bit_for_bit(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    straight = fit_alone(_config(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt))
    history = pd.read_csv(straight.history_path)
    for column in ("train_dm", "val_dm", "train_fake_loss"):
        assert history[column].notna().all() and (history[column] > 0).all(), column
    # only the DM term: the step loss is its value, and val_loss its validation value
    assert (history["train_loss"] == history["train_dm"]).all()
    assert (history["val_loss"] == history["val_dm"]).all()
    a = _latest(tmp_path / "a" / "out")
    stage1 = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    fake = a["state"]["model"]["distribution_matching"]["fake"]
    # the generator moved, and so did the fake score (both from the stage-1 EMA weights); the teacher did not
    assert any(not torch.equal(stage1[k], a["raw_state_dict"][k]) for k in stage1)
    assert any(not torch.equal(stage1[k], fake[k]) for k in stage1)
    teacher = straight.helper("distribution_matching").teacher.state_dict()
    assert all(torch.equal(stage1[k], v) for k, v in teacher.items())
    assert a["state"]["fingerprint"]["distribution_matching"]["n_fake"] == 2

    cfg_b = _config(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt)
    first, resumed = stop_then_resume(cfg_b, 1, run=fit_alone)  # stops after generator step 1, mid-phase
    assert first.step == 1
    b = _latest(tmp_path / "b" / "out")
    for key in ("state_dict", "raw_state_dict"):
        for p in a[key]:
            assert torch.equal(a[key][p], b[key][p]), (key, p)
    fake_b = b["state"]["model"]["distribution_matching"]
    for p in fake:
        assert torch.equal(fake[p], fake_b["fake"][p]), p
    moments = a["state"]["model"]["distribution_matching"]["optimizer"]["state"]
    for i, s in moments.items():
        assert torch.equal(s["exp_avg"], fake_b["optimizer"]["state"][i]["exp_avg"]), i
    ha = history.drop(columns="seconds")
    hb = pd.read_csv(resumed.history_path).drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb)


# -- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss, stage2, message",
    [
        (
            [MSE, {**DM, "weight": 0.0}],
            {},
            r"training\.loss\.losses\[1\]\.weight: expected a positive weight "
            r"\(drop the term to turn it off\), got 0\.0$",
        ),
        (
            [MSE, DM],
            {"generator_loss_mode": "x0_pred"},
            r"training\.loss\.losses\[1\]\.type: expected another term when stage2\.generator_loss_mode is "
            r"x0_pred .*got \"DistributionMatchingLoss\"$",
        ),
        (
            [{**DM, "key": "pred_latent"}],
            {},
            r"training\.loss\.losses\[0\]\.key: expected one of latent, got \"pred_latent\"$",
        ),
        (
            [DM],
            {"distribution_matching": {"t_min": 0.5, "t_max": 0.5}},
            r"stage2\.distribution_matching\.t_max: expected a number > t_min \(0\.5\), got 0\.5$",
        ),
        (
            [DM],
            {"distribution_matching": {"t_max": 1.5}},
            r"stage2\.distribution_matching\.t_max: expected a number > 0 and <= 1, got 1\.5$",
        ),
        (
            [DM],
            {"distribution_matching": {"n_fake": 0}},
            r"stage2\.distribution_matching\.n_fake: expected an integer >= 1, got 0$",
        ),
        (
            [DM],
            {"distribution_matching": {"betas": [0.0, 1.0]}},
            r"stage2\.distribution_matching\.betas: expected two numbers in \[0, 1\), got \[0\.0, 1\.0\]$",
        ),
    ],
)
def test_bad_settings_are_one_line(tmp_path, digits_manifest, small_ae, stage1_ckpt, loss, stage2, message):
    path = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt, loss=loss, stage2=stage2)
    with pytest.raises(UserError, match=message) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_deepspeed_beside_an_online_d_is_refused_before_compute():
    from accelerate.utils import DistributedType

    from trainer.stage2 import check_distribution_matching_supported

    def cfg(mode, *terms):
        loss = SimpleNamespace(losses=[SimpleNamespace(**t) for t in terms])
        return SimpleNamespace(
            training=SimpleNamespace(loss=loss),
            discriminator=SimpleNamespace(training=SimpleNamespace(mode=mode)),
        )

    ds = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    check_distribution_matching_supported(ds, cfg("online", MSE))  # no DM term: fine
    check_distribution_matching_supported(ds, cfg("offline", MSE, DM))  # the fake score: the second engine
    check_distribution_matching_supported(ddp, cfg("online", MSE, DM))  # DDP: any number of modules
    with pytest.raises(
        UserError, match=r"^training\.loss\.losses\[1\]: DistributionMatchingLoss beside an online"
    ):
        check_distribution_matching_supported(ds, cfg("online", MSE, DM))


# -- the MSE term off the sampler's timesteps ----------------------------------------------------------------
def test_avoid_timesteps_redraws_only_banned_ones_uniformly():
    from trainer.diffusion.noise import avoid_timesteps

    banned = torch.tensor([999, 749, 499, 249])
    t = torch.tensor([999, 3, 749, 500, 249, 0, 499, 998])
    out = avoid_timesteps(t, banned, 1000, 7, "x")
    assert not torch.isin(out, banned).any()
    keep = ~torch.isin(t, banned)
    assert torch.equal(out[keep], t[keep]) and not torch.equal(out, t)
    assert torch.equal(out, avoid_timesteps(t, banned, 1000, 7, "x"))  # deterministic
    assert torch.equal(avoid_timesteps(t[keep], banned, 1000, 7, "x"), t[keep])  # nothing to redraw
    # uniform over the allowed timesteps: every one of 6 is hit, none of the 4 banned of 10
    many = avoid_timesteps(torch.arange(10).repeat(300), torch.tensor([0, 3, 6, 9]), 10, 1)
    counts = torch.bincount(many, minlength=10)
    assert counts[[0, 3, 6, 9]].sum() == 0 and counts.min() == 0 and (counts[[1, 2, 4, 5, 7, 8]] > 350).all()


def _mse_trainer(root, manifest, ae, ckpt, skip: bool):
    stage2 = {"generation_steps": 4, "mse_skip_sampler_timesteps": skip}
    return finetune_alone(stage2_config(root, manifest, ae, ckpt, loss=[MSE], stage2=stage2))


def test_mse_skips_the_sampler_timesteps_only_when_asked(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, monkeypatch
):
    from trainer.stage2 import finetune_batch

    on = _mse_trainer(tmp_path / "on", digits_manifest, small_ae, stage1_ckpt, True)
    off = _mse_trainer(tmp_path / "off", digits_manifest, small_ae, stage1_ckpt, False)
    sampler = on.schedule.sampler_timesteps(4)
    assert len(sampler) == 4 and torch.equal(sampler, off.sampler_t)
    drawn = finetune_batch.batch_noise_and_timesteps

    def with_sampler_steps(shape, t_max, *parts):  # the draw, with half its timesteps the sampler's
        noise, t = drawn(shape, t_max, *parts)
        t[: len(sampler)] = sampler
        return noise, t

    monkeypatch.setattr(finetune_batch, "batch_noise_and_timesteps", with_sampler_steps)
    seen = {}
    for name, trainer in (("on", on), ("off", off)):
        outputs = trainer.rollouts.outputs

        def spy(model_output, x_t, t, x0, noise, name=name, outputs=outputs):
            seen[name] = t.clone()
            return outputs(model_output, x_t, t, x0, noise)

        monkeypatch.setattr(trainer.rollouts, "outputs", spy)
        trainer.compute_loss(0)
    expected = with_sampler_steps((8, 4, 8, 8), 1000, on.seed, on.stage, 0, 0)[1]
    assert torch.equal(seen["off"], expected)  # off: the draw as it is, sampler timesteps included
    assert not torch.isin(seen["on"], sampler).any()  # on: none of the sampler's timesteps
    rest = ~torch.isin(expected, sampler)
    assert torch.equal(seen["on"][rest], expected[rest]) and rest.sum() >= 4
    assert (
        "mse_skip_sampler_timesteps" in on.fingerprint and "mse_skip_sampler_timesteps" not in off.fingerprint
    )
    assert "distribution_matching" not in off.fingerprint  # an MSE-only run's fingerprint is as before
