"""Model shapes, parameter counts, and autoencoder loading."""

import pytest
import torch

from models import build_discriminator, build_unet, count_parameters, load_autoencoder, preset
from models.autoencoder import AutoencoderLoadError, ae_export, build_autoencoder, config_scaling
from models.unet import PRESETS


@pytest.mark.parametrize("name", ["tiny", "micro", "unet32_d3", "unet32_d3_attn"])
def test_unet_shapes(name):
    spec = preset(name, in_channels=4, out_channels=4, sample_size=8)
    unet = build_unet(spec)
    x = torch.randn(2, 4, 8, 8)
    assert unet(x, torch.tensor([1, 500])).sample.shape == x.shape


def test_presets_cover_the_spec_names():
    for name in (
        "unet32_d3",
        "unet32_d3_attn",
        "unet48_d3",
        "unet48_d4",
        "unet64_d4",
        "unet64_d4_attn",
        "unet128_d3",
    ):
        assert name in PRESETS


def test_parameter_counts_are_computed_and_ordered():
    def n(name):
        return count_parameters(build_unet(preset(name, in_channels=16, out_channels=16, sample_size=32)))

    big = n("unet64_d4")
    assert 10e6 <= big < 100e6  # "tens of millions" on 16x32x32 latents
    assert n("unet32_d3") < n("unet48_d3") < n("unet48_d4") < big
    assert n("unet64_d4_attn") > big


def test_models_command_prints_counts():
    from helpers import run_cli

    proc = run_cli("-m", "trainer.cli", "models")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("unet64_d4 "))
    count = float(line.split()[1].rstrip("M"))
    expected = count_parameters(
        build_unet(preset("unet64_d4", in_channels=16, out_channels=16, sample_size=32))
    )
    assert abs(count - expected / 1e6) < 0.01


@pytest.mark.parametrize("conditioned", [False, True])
def test_discriminator_returns_logits(conditioned):
    d = build_discriminator(
        dict(latent_channels=16, base_channels=16, num_layers=3, noise_conditioned=conditioned)
    )
    z = torch.randn(5, 16, 32, 32)
    out = d(z, torch.arange(5) * 100) if conditioned else d(z)
    assert out.shape == (5,)
    assert out.dtype == torch.float32
    # logits are unbounded: not squashed into (0, 1)
    d.head[-1].bias.data.fill_(10.0)
    assert (d(z, torch.zeros(5)) if conditioned else d(z)).min() > 1


def test_discriminator_noise_conditioning_changes_output():
    torch.manual_seed(0)
    d = build_discriminator(dict(latent_channels=4, base_channels=16, num_layers=2, noise_conditioned=True))
    z = torch.randn(3, 4, 8, 8)
    assert not torch.allclose(d(z, torch.zeros(3)), d(z, torch.full((3,), 900)))


def test_discriminator_is_batch_independent():
    """GroupNorm: a sample's score does not depend on the rest of its batch (safe under DDP sharding)."""
    torch.manual_seed(0)
    d = build_discriminator(dict(latent_channels=4, base_channels=16, num_layers=2)).eval()
    z = torch.randn(6, 4, 8, 8)
    assert torch.allclose(d(z)[:3], d(z[:3]), atol=1e-5)


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_autoencoder_loads_from_save_pretrained(tmp_path, latent_channels):
    torch.manual_seed(0)
    ae = build_autoencoder(
        in_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        sample_size=16,
    )
    ae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    ae.save_pretrained(str(tmp_path / "vae"))
    loaded = load_autoencoder(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = loaded.encode(x).latent_dist.mean
    assert z.shape == (2, latent_channels, 8, 8)
    assert torch.allclose(z, ae.encode(x).latent_dist.mean, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    s = config_scaling(loaded)
    assert (s.scale, s.shift) == (0.5, 0.1)


def test_autoencoder_loads_from_advdiff_pt(tmp_path):
    ae = build_autoencoder()
    torch.save(ae_export(ae), tmp_path / "ae.pt")
    loaded = load_autoencoder(tmp_path / "ae.pt")
    for a, b in zip(ae.state_dict().values(), loaded.state_dict().values(), strict=False):
        assert torch.equal(a, b)


def test_autoencoder_load_errors(tmp_path):
    with pytest.raises(AutoencoderLoadError, match="autoencoder not found"):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoencoderLoadError, match="no config.json"):
        load_autoencoder(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AutoencoderLoadError, match="unreadable checkpoint"):
        load_autoencoder(tmp_path / "junk.pt")
