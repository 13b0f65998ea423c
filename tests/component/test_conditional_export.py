"""Class-conditional models out to diffusers pipeline folders and back: the exported pipeline samples what
advdiff's sampler samples (classifier-free guidance included), the folder keeps the model's class record, a
plain diffusers UNet with class embeddings reads as M classes without a null label, and `advdiff sample`
takes class labels and a guidance scale; misuse is one line."""

import json
from pathlib import Path

import pytest
import torch

NAMES = ("ant", "bee", "cat")  # C = 3; the null label is class 3
STEPS = 5


def _unet(num_class_embeds, seed=0):
    from models.unet import build_unet, preset

    torch.manual_seed(seed)
    spec = preset("micro", in_channels=4, out_channels=4, sample_size=8, num_class_embeds=num_class_embeds)
    unet = build_unet(spec).eval()
    with torch.no_grad():  # embeddings far apart, so that the class (and guidance) visibly moves the output
        if unet.class_embedding is not None:
            unet.class_embedding.weight.mul_(5.0)
    return unet


def write_export(path: Path, conditioning, ae=None, num_class_embeds=None) -> Path:
    """An advdiff .pt export of a fresh micro UNet (conditional where `conditioning` is given)."""
    from models.autoencoder import LatentScaling
    from trainer.diffusion.checkpoints import export_blob
    from trainer.diffusion.schedule import Schedule

    embeds = num_class_embeds or (None if conditioning is None else conditioning.num_class_embeds)
    unet = _unet(embeds)
    blob = export_blob(
        dict(unet.config),
        unet.state_dict(),
        LatentScaling(0.7, 0.1),
        7,
        {},
        schedule=Schedule("cosine", 200, "v_prediction").to_dict(),
        autoencoder=ae,
        config={},
        dest=path,
        sampling={"sampler": "ddim", "steps": STEPS, "eta": 0.0},
        conditioning=conditioning,
    )
    torch.save(blob, path)
    return path


def ours(ck, noise, labels, scale):
    from trainer.diffusion.sampling import ddim_sample
    from trainer.diffusion.schedule import Schedule

    ddim = Schedule.from_dict(ck.scheduler).ddim()
    null = ck.conditioning.null_class
    return ddim_sample(
        ck.unet, ddim, noise, STEPS, class_labels=labels, guidance_scale=scale, null_class=null
    )


@pytest.fixture()
def conditional(tmp_path, small_ae):
    """(export .pt, pipeline folder, its Conditioning) of a conditional model with a null label."""
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.conditioning import Conditioning
    from trainer.diffusion.export import export_pipeline

    cond = Conditioning.new(NAMES, 0.1)
    pt = write_export(tmp_path / "cond.pt", cond, ae=small_ae)
    folder = export_pipeline(load_diffusion_checkpoint(pt), tmp_path / "pipe", autoencoder=small_ae)
    return pt, folder, cond


def test_exported_pipeline_samples_what_advdiff_samples(conditional):
    from diffusers import DiffusionPipeline

    from models.autoencoder import decode, load_autoencoder
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    pt, folder, cond = conditional
    index = json.loads((folder / "model_index.json").read_text())
    assert index["conditioning"] == cond.to_dict()
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert type(pipe).__name__ == "AdvdiffLatentPipeline" and pipe.config.sampling_steps == STEPS
    ck = load_diffusion_checkpoint(pt)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1, 2])
    got = {}
    for scale in (1.0, 3.0):
        want = ours(ck, noise, labels, scale)
        got[scale] = pipe(
            latents=noise, class_labels=labels, guidance_scale=scale, output_type="latent"
        ).images
        assert torch.allclose(got[scale], want, atol=1e-5), (scale, (got[scale] - want).abs().max())
    assert (got[3.0] - got[1.0]).abs().max() > 1e-2  # guidance changes the samples
    other = pipe(latents=noise, class_labels=[1, 1, 1, 1], output_type="latent").images
    assert (other - got[1.0]).abs().max() > 1e-2  # and so does the class
    by_name = pipe(
        latents=noise, class_labels=["ant", "cat", "bee", 2], guidance_scale=3.0, output_type="latent"
    )
    assert torch.equal(by_name.images, got[3.0])
    images = pipe(latents=noise, class_labels=labels, output_type="pt").images
    want = (
        decode(load_autoencoder(ck.autoencoder), ck.scaling.from_model(ours(ck, noise, labels, 1.0))) / 2
        + 0.5
    )
    assert images.shape == (4, 1, 32, 32) and torch.allclose(images, want.clamp(0, 1), atol=1e-4)
    pil = pipe(class_labels=["bee", "bee"], generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (32, 32)


def test_folder_gives_back_the_conditioning_and_reexports_it(conditional, tmp_path):
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.export import export_pipeline

    pt, folder, cond = conditional
    ck = load_diffusion_checkpoint(folder)
    assert ck.kind == "pipeline" and ck.conditioning == cond
    assert ck.conditioning.null_class == 3 and ck.conditioning.class_names == NAMES
    again = export_pipeline(ck, tmp_path / "again")
    assert json.loads((again / "model_index.json").read_text())["conditioning"] == cond.to_dict()
    first = load_diffusion_checkpoint(pt)
    assert all(torch.equal(first.weights[k], ck.weights[k]) for k in first.weights)


def test_unconditional_export_has_no_class_record(tmp_path):
    from diffusers import DiffusionPipeline

    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.export import export_pipeline

    folder = export_pipeline(load_diffusion_checkpoint(write_export(tmp_path / "u.pt", None)), tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    assert set(index) == {
        "_class_name",
        "_diffusers_version",
        "sampling_eta",
        "sampling_steps",
        "scheduler",
        "unet",
        "vae",
    }
    assert load_diffusion_checkpoint(folder).conditioning is None
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert pipe.class_record is None
    with pytest.raises(ValueError, match=r"^class_labels: this pipeline's UNet is unconditional"):
        pipe(class_labels=[0], output_type="latent")
    with pytest.raises(ValueError, match=r"^guidance_scale: this pipeline's UNet is unconditional"):
        pipe(guidance_scale=2.0, output_type="latent")
    assert pipe(batch_size=3, output_type="latent").images.shape == (3, 4, 8, 8)


def test_plain_diffusers_unet_with_class_embeddings_has_m_classes_and_no_null(tmp_path):
    from diffusers import DiffusionPipeline

    from trainer.diffusion.checkpoints import load_diffusion_checkpoint, read_source
    from trainer.diffusion.conditioning import Conditioning
    from trainer.diffusion.export import export_pipeline
    from trainer.diffusion.schedule import Schedule

    _unet(4).save_pretrained(str(tmp_path / "unet"))
    Schedule("cosine", 200, "v_prediction").ddim().save_pretrained(str(tmp_path / "scheduler"))
    want = Conditioning(4, ("0", "1", "2", "3"), None, 0.0)
    assert read_source(tmp_path / "unet").conditioning == want
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    ck = load_diffusion_checkpoint(tmp_path)
    assert ck.kind == "pipeline" and ck.conditioning == want
    folder = export_pipeline(ck, tmp_path / "out", steps=STEPS)
    assert load_diffusion_checkpoint(folder).conditioning == want
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    got = pipe(latents=noise, class_labels=["3", 0], output_type="latent").images
    assert torch.allclose(got, ours(ck, noise, torch.tensor([3, 0]), 1.0), atol=1e-5)
    with pytest.raises(ValueError, match=r"^guidance_scale: this model has no null class") as e:
        pipe(latents=noise, class_labels=[3, 0], guidance_scale=2.0, output_type="latent")
    assert "\n" not in str(e.value)


def test_pipeline_refusals_are_one_line(conditional):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(conditional[1]), trust_remote_code=True)
    bad = [
        ({}, r"^class_labels: this pipeline's UNet is class-conditional; give one class"),
        (
            {"class_labels": ["ant", "zebra"]},
            r"^class_labels: unknown class name 'zebra' \(the classes: 'ant'",
        ),
        ({"class_labels": [3]}, r"^class_labels: class index 3 is outside 0..2"),
        ({"class_labels": [0.5]}, r"^class_labels: expected class indices or names, got 0.5"),
        ({"class_labels": [0, 1], "batch_size": 3}, r"^batch_size: 3, but 2 class_labels"),
        ({"class_labels": [0], "latents": torch.zeros(2, 4, 8, 8)}, r"^latents: 2 rows, but 1 class_labels"),
        ({"class_labels": [0], "guidance_scale": float("nan")}, r"^guidance_scale: expected a finite number"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message) as e:
            pipe(output_type="latent", **kwargs)
        assert "\n" not in str(e.value)


def test_class_records_that_do_not_fit_are_one_line(conditional):
    from trainer.core.errors import UserError
    from trainer.diffusion.checkpoints import read_source

    folder = conditional[1]
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    for record, message in [
        (
            {**index["conditioning"], "null_class": None},
            "3 classes need num_class_embeds 3, unet/config.json has 4",
        ),
        ({**index["conditioning"], "class_names": ["a", "b"]}, "expected {num_classes, class_names"),
        ({**index["conditioning"], "null_class": 1}, "null_class must be num_classes"),
        ("three", "expected {num_classes, class_names"),
    ]:
        index_file.write_text(json.dumps({**index, "conditioning": record}))
        with pytest.raises(UserError, match=r"model_index.json: conditioning: ") as e:
            read_source(folder)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_sample_command_with_class_labels(conditional, tmp_path, capsys):
    from trainer.cli.main import main
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.noise import per_sample_noise

    pt = conditional[0]
    ck = load_diffusion_checkpoint(pt)
    noise = per_sample_noise(range(5), ck.latent_shape, 0, "sample")
    for flags, labels, scale in [
        ([], [0, 1, 2, 0, 1], 1.0),  # all classes in turn
        (["--class_labels", "cat, 0", "--guidance_scale", "2.5"], [2, 0, 2, 0, 2], 2.5),
    ]:
        prefix = tmp_path / f"s{len(flags)}"
        args = ["sample", str(pt), "--out", str(prefix), "--num", "5", "--steps", str(STEPS), "--no_grid"]
        assert main(args + flags) == 0, capsys.readouterr().err
        assert (
            f"{len(set(labels))} of 3 classes, classifier-free guidance scale {scale}"
            in capsys.readouterr().out
        )
        assert torch.load(f"{prefix}.labels.pt").tolist() == labels
        want = ours(ck, noise, torch.tensor(labels), scale)
        assert torch.allclose(torch.load(f"{prefix}.pt"), want, atol=1e-5)


def test_sample_command_refusals_are_one_line(conditional, tmp_path, capsys):
    from trainer.cli.main import main

    unconditional = write_export(tmp_path / "u.pt", None)
    plain = write_export(tmp_path / "plain.pt", None, num_class_embeds=3)  # M = 3 classes, no null label
    out = ["--out", str(tmp_path / "s"), "--num", "2", "--steps", "2", "--no_grid"]
    cases = [
        (unconditional, ["--class_labels", "1"], "--class_labels: ", "is an unconditional model"),
        (unconditional, ["--guidance_scale", "2"], "--guidance_scale: ", "is an unconditional model"),
        (conditional[0], ["--discriminator", "d.pt"], "--discriminator: ", "discriminator guidance is for"),
        (
            conditional[0],
            ["--class_labels", "ant,zebra"],
            "--class_labels: 'zebra' is neither",
            "(ant, bee, cat)",
        ),
        (conditional[0], ["--class_labels", "3"], "--class_labels: '3' is neither", "index 0..2"),
        (plain, ["--guidance_scale", "2"], "--guidance_scale: ", "has no null class"),
    ]
    for ckpt, flags, start, middle in cases:
        assert main(["sample", str(ckpt), *out, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"advdiff: error: {start}") and middle in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("s*"))
