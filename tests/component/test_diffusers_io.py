"""Models in and out of the diffusers ecosystem: a diffusers UNet2DModel folder or pipeline folder as the
stage-1 model, pipeline folders out (safetensors, no pickles, no absolute paths), and exports written
before the UNet and scheduler were stored as full diffusers configs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import stage2_config

ATTN_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)


def custom_betas(n=200):
    return (np.linspace(1e-4**0.5, 0.03**0.5, n) ** 2).tolist()


def write_pipeline_folder(root: Path, unet_kwargs=ATTN_UNET, vae=True, scaling=(0.9, 0.05)) -> Path:
    """A pipeline folder as diffusers tools save one: model_index.json, unet/, scheduler/, vae/."""
    from diffusers import DDPMScheduler, UNet2DModel

    from models.autoencoder import build_autoencoder

    torch.manual_seed(3)
    UNet2DModel(**unet_kwargs).save_pretrained(str(root / "unet"))
    DDPMScheduler(
        num_train_timesteps=200, trained_betas=custom_betas(), prediction_type="epsilon", clip_sample=False
    ).save_pretrained(str(root / "scheduler"))
    index = {
        "_class_name": "SomeLatentPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if vae:
        ae = build_autoencoder()
        ae.register_to_config(scaling_factor=scaling[0], shift_factor=scaling[1])
        ae.save_pretrained(str(root / "vae"))
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def assert_portable(folder: Path):
    """No pickles, and no absolute path in any text file."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt")], files
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for p in files:
        if p.suffix in (".json", ".py", ".txt"):
            text = p.read_text()
            for root in ("/tmp", "/root", "/home", "/work", str(Path.home()), str(folder.resolve())):
                assert root not in text, (p, root)
            if p.suffix == ".json":
                for value in _strings(json.loads(text)):
                    assert not value.startswith("/"), (p, value)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def our_images(ckpt_path, noise, steps):
    """advdiff's own sampler and decoder, in [0, 1] like the pipeline's output_type="pt"."""
    from models.autoencoder import decode, load_autoencoder
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.sampling import ddim_sample
    from trainer.diffusion.schedule import Schedule

    ck = load_diffusion_checkpoint(ckpt_path)
    z = ddim_sample(ck.unet, Schedule.from_dict(ck.scheduler).ddim(), noise, steps)
    return (decode(load_autoencoder(ck.autoencoder), ck.scaling.from_model(z)) / 2 + 0.5).clamp(0, 1), ck


# -- in: folders and old exports --------------------------------------------------------------------------
def test_pipeline_folder_reads_as_a_source(tmp_path):
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint, read_source

    root = write_pipeline_folder(tmp_path / "pipe")
    src = read_source(root)
    assert src.kind == "pipeline" and src.latent_shape == (4, 8, 8)
    assert src.unet_config["down_block_types"] == list(ATTN_UNET["down_block_types"])
    assert src.scheduler["trained_betas"] == pytest.approx(custom_betas())
    assert (src.scaling.scale, src.scaling.shift) == pytest.approx((0.9, 0.05))
    assert Path(src.autoencoder) == (root / "vae").resolve()
    ck = load_diffusion_checkpoint(root)
    from diffusers import DDPMScheduler, UNet2DModel

    ref = UNet2DModel.from_pretrained(str(root / "unet")).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 150])
    with torch.no_grad():
        assert torch.equal(ck.unet(x, t).sample, ref(x, t).sample)
    # the custom betas reach the training maths
    from trainer.diffusion.schedule import Schedule

    sched = Schedule.from_dict(ck.scheduler)
    assert torch.allclose(
        sched.train.alphas_cumprod, DDPMScheduler.from_pretrained(str(root / "scheduler")).alphas_cumprod
    )


def test_unet_folder_takes_its_sibling_scheduler_or_the_fallback(tmp_path):
    from trainer.core.errors import UserError
    from trainer.diffusion.checkpoints import read_source
    from trainer.diffusion.schedule import Schedule

    root = write_pipeline_folder(tmp_path / "pipe", vae=False)
    src = read_source(root / "unet")
    assert src.kind == "unet" and src.scheduler["num_train_timesteps"] == 200 and src.scaling is None
    alone = tmp_path / "alone"
    (root / "unet").rename(alone)
    fallback = Schedule("cosine", 1000, "v_prediction").to_dict()
    assert read_source(alone, fallback_scheduler=fallback).scheduler == fallback
    with pytest.raises(UserError, match="no scheduler"):
        read_source(alone)


def test_other_conditioning_and_foreign_models_are_refused_in_one_line(tmp_path):
    """Class labels through num_class_embeds load (tests/component/test_conditional_export.py); a UNet2DModel
    conditioned another way (class_embed_type) and other model classes are refused."""
    from trainer.core.errors import UserError
    from trainer.diffusion.checkpoints import read_source

    conditional = write_pipeline_folder(
        tmp_path / "c", unet_kwargs={**ATTN_UNET, "class_embed_type": "timestep"}, vae=False
    )
    with pytest.raises(UserError, match="class_embed_type 'timestep': only class labels through num_class"):
        read_source(conditional)
    cfg = json.loads((conditional / "unet" / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (conditional / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="UNet2DConditionModel, not a UNet2DModel"):
        read_source(conditional)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers UNet2DModel folder"):
        read_source(tmp_path / "empty")
    nowts = write_pipeline_folder(tmp_path / "w", vae=False)
    (nowts / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        read_source(nowts)


def test_exports_written_before_full_configs_still_load(tmp_path, small_ae):
    """An export with a preset `unet_spec`, a {type, num_steps, prediction_type} schedule and an absolute AE
    path samples exactly like the preset model with the old DDIM settings."""
    from diffusers import DDIMScheduler

    from models.autoencoder import LatentScaling
    from models.unet import build_unet, preset, spec_to_dict
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.sampling import ddim_sample
    from trainer.diffusion.schedule import Schedule

    spec = preset("micro", in_channels=4, out_channels=4, sample_size=8)
    torch.manual_seed(0)
    unet = build_unet(spec).eval()
    old = {
        "format": "advdiff.diffusion",
        "unet_spec": spec_to_dict(spec),
        "state_dict": unet.state_dict(),
        "raw_state_dict": None,
        "scheduler": {"type": "cosine", "num_steps": 1000, "prediction_type": "v_prediction"},
        "latent_scaling": LatentScaling(0.7, 0.1).to_dict(),
        "autoencoder": str(Path(small_ae).resolve()),
        "step": 3,
        "metrics": {},
        "config": {},
    }
    torch.save(old, tmp_path / "old.pt")
    ck = load_diffusion_checkpoint(tmp_path / "old.pt")
    assert ck.autoencoder == str(Path(small_ae).resolve()) and ck.latent_shape == (4, 8, 8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(ck.unet, Schedule.from_dict(ck.scheduler).ddim(), noise, 4)
    old_ddim = DDIMScheduler(  # the DDIM such exports were sampled with (diffusers' leading spacing)
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    before = ddim_sample(unet, old_ddim, noise, 4)
    assert torch.equal(ours, before)


def test_exports_store_the_autoencoder_relative_to_themselves(tmp_path, stage1_ckpt):
    """A run folder copied elsewhere (with its AE beside it) still finds the AE."""
    import shutil

    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    blob = torch.load(stage1_ckpt, map_location="cpu", weights_only=True)
    assert not Path(blob["autoencoder"]).is_absolute()
    assert "unet_config" in blob and blob["scheduler"]["num_train_timesteps"] > 0
    ae = (stage1_ckpt.parent / blob["autoencoder"]).resolve()
    moved = tmp_path / "elsewhere" / "run" / "stage1"
    moved.mkdir(parents=True)
    shutil.copy(stage1_ckpt, moved / "checkpoint_best.pt")
    target = (moved / blob["autoencoder"]).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ae, target)
    assert Path(load_diffusion_checkpoint(moved / "checkpoint_best.pt").autoencoder).resolve() == target


# -- out: pipeline folders --------------------------------------------------------------------------------
def test_stage1_writes_a_pipeline_that_matches_the_checkpoint(tmp_path, stage1_ckpt):
    from diffusers import DiffusionPipeline, UNet2DModel

    from models.pipeline import AdvdiffLatentPipeline
    from trainer.cli.main import main
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    auto = stage1_ckpt.parent / "pipeline"  # stage 1 wrote it beside its checkpoints
    assert (auto / "model_index.json").is_file()
    out = tmp_path / "exported"
    assert main(["export", str(stage1_ckpt), str(out)]) == 0
    for folder in (auto, out):
        assert_portable(folder)
    ck = load_diffusion_checkpoint(stage1_ckpt)
    ref = UNet2DModel.from_pretrained(str(out / "unet")).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
    with torch.no_grad():
        assert torch.equal(ref(x, t).sample, ck.unet(x, t).sample)
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert type(pipe).__name__ == AdvdiffLatentPipeline.__name__
    steps = ck.sampling["steps"]
    assert pipe.config.sampling_steps == steps
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = pipe(latents=noise, output_type="pt").images
    want, _ = our_images(stage1_ckpt, noise, steps)
    assert got.shape == (4, 1, 32, 32)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (32, 32)
    latents = pipe(latents=noise, output_type="latent").images
    assert latents.shape == noise.shape


def test_export_command_bad_inputs_are_one_line(tmp_path, stage1_ckpt, capsys):
    from trainer.cli.main import main

    assert main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "o")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    run = stage1_ckpt.parents[1]
    assert main(["export", str(run), str(tmp_path / "o"), "--iteration", "3"]) == 2
    assert "--iteration 3: no best checkpoint of that iteration" in capsys.readouterr().err
    assert main(["export", str(stage1_ckpt), str(tmp_path / "o"), "--ae", str(tmp_path / "nope")]) == 2
    assert "--ae" in capsys.readouterr().err
    # a run folder without stage 2 exports stage 1's best
    assert main(["export", str(run), str(tmp_path / "from_run"), "--no_vae"]) == 0
    assert json.loads((tmp_path / "from_run" / "advdiff.json").read_text())["source"] == "checkpoint_best.pt"
    assert not (tmp_path / "from_run" / "vae").exists()


@pytest.mark.slow
def test_round_trip_stage1_pipeline_stage2_pipeline(tmp_path, digits_manifest, stage1_ckpt):
    """stage-1 export -> pipeline folder -> stage 2 -> pipeline folder, with the model's config intact."""
    from trainer.config.load import load_config
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.run import run

    stage1_pipeline = stage1_ckpt.parent / "pipeline"
    cfg_path = stage2_config(tmp_path, digits_manifest, stage1_pipeline / "vae", stage1_pipeline)
    data = yaml.safe_load(cfg_path.read_text())
    data["autoencoder"] = {"checkpoint": None}
    data["stage2"].update(num_samples=16, val_samples=4, grid_samples=0, diffusion_epochs=1)
    data["discriminator"]["training"]["epochs"] = 1
    cfg_path.write_text(yaml.safe_dump(data))
    run(load_config(cfg_path), build_accelerator("cpu"))
    first = load_diffusion_checkpoint(stage1_ckpt)
    second = load_diffusion_checkpoint(tmp_path / "out" / "pipeline")
    assert second.kind == "pipeline" and second.unet_config == first.unet_config
    assert second.scheduler == first.scheduler
    assert second.scaling == first.scaling
    assert_portable(tmp_path / "out" / "pipeline")
