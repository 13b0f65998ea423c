"""Discriminator guidance (trainer/diffusion/guidance.py), the guided DDIM sampler and `advdiff sample`.

The quantitative check uses a case where the answer is known in closed form: the "model" is the exact
denoiser of N(0, I) data (eps(x_t) = s_t x_t), the "data" is N(w u, I), and D's logit is the exact
log density ratio of the noised marginals, a_t u·x_t (+ const). Guidance with weight w then turns the
model's score into the data's, and DDIM's mean is exact for Gaussian data: the guided samples' mean
must be w u, the unguided ones' 0.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models.discriminator import build_discriminator
from trainer.diffusion.guidance import Guidance, correct_output, discriminator_gradient, guided_output
from trainer.diffusion.noise import eta_generators, per_sample_noise
from trainer.diffusion.sampling import ddim_sample, ddim_step
from trainer.diffusion.schedule import Schedule

SHAPE = (4, 8, 8)
PRED_TYPES = ["epsilon", "v_prediction"]


def schedule(pred="epsilon"):
    return Schedule("linear", 1000, pred)


def micro_unet(seed=0):
    from models.unet import build_unet, preset

    torch.manual_seed(seed)
    return build_unet(preset("micro", in_channels=4, out_channels=4, sample_size=8)).eval()


def tiny_d(noise_conditioned=True, seed=0):
    torch.manual_seed(seed)
    return build_discriminator(
        {"latent_channels": 4, "base_channels": 8, "num_layers": 2, "noise_conditioned": noise_conditioned}
    )


def _ab(sched, t, device):
    return (
        sched.train.alphas_cumprod.to(device)[torch.as_tensor(t, device=device)].float().reshape(-1, 1, 1, 1)
    )


class GaussianModel(nn.Module):
    """The exact denoiser of N(0, I) data, in either prediction type: eps = s x_t, v = (eps - s x_t) / a."""

    def __init__(self, sched):
        super().__init__()
        self.sched = sched

    def forward(self, x, t):
        ab = _ab(self.sched, t, x.device)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = s * x
        out = (eps - s * x) / a if self.sched.prediction_type == "v_prediction" else eps
        return SimpleNamespace(sample=out)


class TiltD(nn.Module):
    """log [N(a_t u, I) / N(0, I)](x_t) = a_t u·x_t - a_t²|u|²/2: the exact noisy log-ratio of data N(u, I)
    against the model's N(0, I). With clean=True: u·x (what a D of clean latents would say)."""

    def __init__(self, sched, u, clean=False):
        super().__init__()
        self.sched, self.u, self.clean = sched, u, clean

    def forward(self, z, t):
        a = torch.ones(z.shape[0], 1, 1, 1) if self.clean else _ab(self.sched, t, z.device).sqrt()
        return (a * self.u * z).sum((1, 2, 3)) - (a.flatten() ** 2) * (self.u**2) * z[0].numel() / 2


class Quadratic(nn.Module):
    """logit = -|z - c|²: its gradient is -2 (z - c), known exactly."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.lin = nn.Linear(1, 1)  # a parameter, to check D is never changed

    def forward(self, z, t):
        return -((z - self.c) ** 2).sum((1, 2, 3)) + 0 * self.lin.weight.sum()


def old_ddim_sample(unet, ddim, noise, steps, eta=0.0, batch_size=64, gen_parts=None, indices=None):
    """A copy of ddim_sample's loop as it was before guidance (the reference for bit-identity)."""
    with torch.inference_mode():
        out = []
        for s in range(0, noise.shape[0], batch_size):
            x = noise[s : s + batch_size].contiguous(memory_format=torch.channels_last)
            ddim.set_timesteps(steps, device=x.device)
            gens = None
            if eta > 0 and gen_parts is not None and indices is not None:
                gens = eta_generators(indices[s : s + batch_size], *gen_parts)
            for t in ddim.timesteps:
                x = ddim_step(ddim, unet(x, t).sample, t, x, eta, gens)
            out.append(x.contiguous())
        return torch.cat(out)


# -- the correction's algebra ---------------------------------------------------------------------------
@pytest.mark.parametrize("pred", PRED_TYPES)
def test_correction_is_the_score_shift_in_the_models_prediction_type(pred):
    sched = schedule(pred)
    g = torch.Generator().manual_seed(1)
    x, out, grad = (torch.randn((3, *SHAPE), generator=g) for _ in range(3))
    t = torch.tensor([5, 400, 990])
    w = 1.7
    new = correct_output(sched, out, x, t, grad, w)
    eps, x0 = sched.predictions(out, x, t)
    new_eps, new_x0 = sched.predictions(new, x, t)
    s = (1 - _ab(sched, t, x.device)).sqrt()
    torch.testing.assert_close(new_eps, eps - w * s * grad, atol=2e-4, rtol=1e-4)
    # the clean latent implied by (x_t, eps') and the output rebuilt from it the diffusers way
    a = _ab(sched, t, x.device).sqrt()
    torch.testing.assert_close(new_x0, (x - s * new_eps) / a, atol=2e-3, rtol=1e-4)
    if pred == "v_prediction":
        torch.testing.assert_close(new, sched.train.get_velocity(new_x0, new_eps, t), atol=2e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(new, new_eps)
    # eps <-> v round trip: the v of (x0, eps) reads back as (eps, x0)
    v = sched.train.get_velocity(x0, eps, t)
    back_eps, back_x0 = schedule("v_prediction").predictions(v, x, t)
    torch.testing.assert_close(back_eps, eps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(back_x0, x0, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_weight_zero_is_identity_and_weight_one_is_not(pred):
    sched, unet, d = schedule(pred), micro_unet(), tiny_d()
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(2))
    t = torch.tensor(700)
    out = unet(x, t).sample.detach()
    for mode in ("x_t", "x0_pred"):
        same = guided_output(Guidance(d, weight=0.0, input=mode), sched, unet, x, t, model_output=out)
        assert torch.equal(same, out)
        moved = guided_output(Guidance(d, weight=1.0, input=mode), sched, unet, x, t, model_output=out)
        assert not torch.allclose(moved, out)


def test_gradient_is_the_logits_gradient_inside_inference_mode_and_d_is_untouched():
    sched, c = schedule(), 0.5
    d = Quadratic(c).train()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    with torch.inference_mode():  # as in a caller's sampler: x is an inference tensor
        x = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(3))
        g, out = discriminator_gradient(Guidance(d), sched, x, torch.tensor(500))
    assert out is None
    torch.testing.assert_close(g, -2 * (x - c))
    assert d.training and d.lin.weight.grad is None
    assert all(torch.equal(v, before[k]) for k, v in d.state_dict().items())


def test_x0_pred_gradient_runs_through_the_unet():
    sched, unet, d = schedule(), micro_unet(), tiny_d()
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([300, 600])
    with torch.inference_mode():
        g, out = discriminator_gradient(Guidance(d, input="x0_pred"), sched, x, t, unet)
    xr = x.clone().requires_grad_(True)
    ref_out = unet(xr, t).sample
    d(sched.predictions(ref_out, xr, t)[1], t).sum().backward()
    torch.testing.assert_close(g, xr.grad)
    torch.testing.assert_close(out, ref_out.detach())
    g_xt, _ = discriminator_gradient(Guidance(d, input="x_t"), sched, x, t)
    assert not torch.allclose(g, g_xt)  # the two inputs are different gradients


def test_off_outside_t_min_t_max_per_sample():
    sched, unet, d = schedule(), micro_unet(), tiny_d()
    x = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([10, 149, 150, 800])  # t_min 0.15 of 1000 steps: the first two are off
    out = unet(x, t).sample.detach()
    new = guided_output(Guidance(d, weight=2.0), sched, unet, x, t, model_output=out)
    assert torch.equal(new[:2], out[:2])
    assert not torch.allclose(new[2:], out[2:])
    narrow = guided_output(Guidance(d, weight=2.0, t_min=0.2, t_max=0.5), sched, unet, x, t, model_output=out)
    assert torch.equal(narrow, out)
    small = guided_output(Guidance(d, weight=2.0), sched, unet, x, torch.tensor(100), model_output=out)
    assert torch.equal(small, out)


def test_guidance_rejects_bad_settings():
    for kw in (
        {"t_min": 0.6, "t_max": 0.5},
        {"t_min": -0.1},
        {"t_max": 1.5},
        {"weight": float("nan")},
        {"input": "x0"},
    ):
        with pytest.raises(ValueError):
            Guidance(tiny_d(), **kw)


# -- the sampler ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sample_without_guidance_is_bit_identical_to_the_old_loop(eta):
    sched, unet = schedule(), micro_unet()
    idx = list(range(3))
    noise = per_sample_noise(idx, SHAPE, 7, "t")
    new = ddim_sample(unet, sched.ddim(), noise, 3, eta=eta, batch_size=2, gen_parts=(7, "t"), indices=idx)
    old = old_ddim_sample(
        unet, sched.ddim(), noise, 3, eta=eta, batch_size=2, gen_parts=(7, "t"), indices=idx
    )
    assert torch.equal(new, old)
    # the guided path with guidance active at no step (t_min = t_max = 1: t <= 999) gives the same bits
    never = Guidance(tiny_d(), weight=2.0, t_min=1.0, t_max=1.0)
    assert torch.equal(
        ddim_sample(
            unet,
            sched.ddim(),
            noise,
            3,
            eta=eta,
            batch_size=2,
            gen_parts=(7, "t"),
            indices=idx,
            guidance=never,
        ),
        old,
    )
    on = Guidance(tiny_d(), weight=2.0)
    assert not torch.allclose(
        ddim_sample(
            unet, sched.ddim(), noise, 3, eta=eta, batch_size=2, gen_parts=(7, "t"), indices=idx, guidance=on
        ),
        old,
    )


def test_guided_sampler_works_inside_a_callers_inference_mode_and_is_batch_independent():
    sched, unet = schedule("v_prediction"), micro_unet()
    g = Guidance(tiny_d(), weight=1.5, input="x0_pred")
    with torch.inference_mode():
        noise = per_sample_noise(range(3), SHAPE, 3, "t")
        a = ddim_sample(unet, sched.ddim(), noise, 3, batch_size=3, guidance=g)
    b = ddim_sample(unet, sched.ddim(), noise.clone(), 3, batch_size=2, guidance=g)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("mode", ["x_t", "x0_pred"])
def test_guidance_moves_samples_to_the_tilted_distribution(pred, mode):
    sched = schedule(pred)
    model, u = GaussianModel(sched), 1.0
    d = TiltD(sched, u, clean=(mode == "x0_pred"))  # a clean-latent D through x0(x_t) = a x_t: same gradient
    noise = per_sample_noise(range(64), SHAPE, 11, "g")
    plain = ddim_sample(model, sched.ddim(), noise, 20)
    means = {}
    for w in (0.5, 1.0):
        z = ddim_sample(model, sched.ddim(), noise, 20, guidance=Guidance(d, weight=w, t_min=0.0, input=mode))
        means[w] = float(z.mean())
        assert float(d(z, torch.zeros(64, dtype=torch.long)).mean()) > float(
            d(plain, torch.zeros(64, dtype=torch.long)).mean()
        )
    assert abs(float(plain.mean())) < 0.03
    assert abs(means[0.5] - 0.5 * u) < 0.03 and abs(means[1.0] - u) < 0.03, means
    # the default t_min (off for t < 0.15 T) leaves part of the way to the model alone
    late = ddim_sample(model, sched.ddim(), noise, 20, guidance=Guidance(d, weight=1.0, input=mode))
    assert 0.2 < float(late.mean()) < means[1.0] - 0.05


# -- `advdiff sample` ---------------------------------------------------------------------------------------
def _checkpoint(path, ae, channels=4, pred="epsilon"):
    from models.autoencoder import LatentScaling
    from models.unet import build_unet, preset, unet_config
    from trainer.diffusion.checkpoints import export_blob

    spec = preset("micro", in_channels=channels, out_channels=channels, sample_size=8)
    torch.manual_seed(0)
    unet = build_unet(spec)
    blob = export_blob(
        unet_config(spec),
        unet.state_dict(),
        LatentScaling(scale=1.0, shift=0.0),
        0,
        {},
        schedule={"type": "linear", "num_steps": 1000, "prediction_type": pred},
        autoencoder=str(ae) if ae else None,
        config={},
        dest=path,
    )
    torch.save(blob, path)
    return path


def _d_file(path, noise_conditioned=True, channels=4):
    from trainer.stage2.discriminator_trainer import D_FORMAT

    torch.manual_seed(0)
    d = build_discriminator(
        {
            "latent_channels": channels,
            "base_channels": 8,
            "num_layers": 2,
            "noise_conditioned": noise_conditioned,
        }
    )
    torch.save({"format": D_FORMAT, "config": d.config, "state_dict": d.state_dict()}, path)
    return path


def _run(argv, capsys):
    from trainer.cli.main import main

    capsys.readouterr()
    rc = main(["sample", *argv])
    return rc, capsys.readouterr()


def test_sample_command_writes_latents_and_grid(tmp_path, small_ae, capsys):
    ckpt, d = _checkpoint(tmp_path / "c.pt", small_ae), _d_file(tmp_path / "d.pt")
    base = [str(ckpt), "--num", "3", "--steps", "3", "--seed", "4", "--eta", "0.5", "--device", "cpu"]
    rc, io = _run([*base, "--out", str(tmp_path / "plain"), "--batch_size", "2"], capsys)
    assert rc == 0, io.err
    plain = torch.load(tmp_path / "plain.pt")
    assert plain.shape == (3, *SHAPE) and (tmp_path / "plain.png").stat().st_size > 0
    rc, io = _run([*base, "--out", str(tmp_path / "plain5"), "--batch_size", "3", "--no_grid"], capsys)
    assert rc == 0 and not (tmp_path / "plain5.png").exists()
    torch.testing.assert_close(torch.load(tmp_path / "plain5.pt"), plain, atol=1e-5, rtol=1e-5)
    rc, io = _run(
        [
            *base,
            "--out",
            str(tmp_path / "guided"),
            "--discriminator",
            str(d),
            "--guidance_weight",
            "2",
            "--guidance_t_min",
            "0.1",
        ],
        capsys,
    )
    assert rc == 0, io.err
    assert "guidance w=2.0" in io.out
    guided = torch.load(tmp_path / "guided.pt")
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    assert (tmp_path / "guided.png").is_file()


def _bad_cases(tmp_path, small_ae):
    ckpt = _checkpoint(tmp_path / "c.pt", None)
    three = _checkpoint(tmp_path / "c3.pt", None, channels=3)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something.else"}, foreign)
    plain_d, d = _d_file(tmp_path / "d0.pt", noise_conditioned=False), _d_file(tmp_path / "d.pt")
    guide = ["--discriminator"]
    return [
        ([str(tmp_path / "none.pt")], f"{tmp_path / 'none.pt'}: checkpoint not found"),
        ([str(junk)], f"{junk}: unreadable checkpoint"),
        ([str(foreign)], f"{foreign}: not an advdiff diffusion checkpoint"),
        ([str(ckpt), *guide, str(tmp_path / "nod.pt")], f"--discriminator: {tmp_path / 'nod.pt'}: not found"),
        ([str(ckpt), *guide, str(junk)], f"{junk}: unreadable discriminator"),
        ([str(ckpt), *guide, str(foreign)], f"--discriminator: {foreign}: not an advdiff discriminator"),
        ([str(ckpt), *guide, str(plain_d)], f"--discriminator: {plain_d}: D is not noise_conditioned"),
        (
            [str(three), *guide, str(d)],
            f"--discriminator: {d}: D takes 4-channel latents, the checkpoint's UNet makes 3-channel ones",
        ),
        (
            [str(three), "--ae", str(small_ae)],
            f"--ae: {small_ae}: latent channels 4 differ from the checkpoint's UNet's 3",
        ),
        (
            [str(ckpt), "--ae", str(tmp_path / "noae")],
            f"autoencoder.checkpoint: {tmp_path / 'noae'}: autoencoder not found",
        ),
        ([str(ckpt), "--num", "0"], "--num: expected at least 1, got 0"),
        (
            [str(ckpt), *guide, str(d), "--guidance_t_min", "0.9", "--guidance_t_max", "0.5"],
            "--guidance_t_min, --guidance_t_max: expected 0 <= t_min <= t_max <= 1, got 0.9, 0.5",
        ),
        ([str(ckpt), "--guidance_weight", "2"], "--guidance_weight: given without --discriminator"),
        ([str(ckpt), "--steps", "2000"], "--steps: at most 1000 (the checkpoint's schedule), got 2000"),
    ]


def test_sample_command_bad_inputs_are_one_line_and_exit_2(tmp_path, small_ae, capsys):
    for argv, expected in _bad_cases(tmp_path, small_ae):
        out = tmp_path / "out"
        rc, io = _run(["--num", "2", "--steps", "2", "--device", "cpu", *argv, "--out", str(out)], capsys)
        lines = io.err.strip().splitlines()
        assert rc == 2, (argv, io.err)
        assert len(lines) == 1 and lines[0].startswith(f"advdiff: error: {expected}"), (argv, io.err)
        assert "Traceback" not in io.err
        assert not list(tmp_path.glob("out*")), argv
