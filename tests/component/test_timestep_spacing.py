"""DDIM timestep spacing (scheduler.timestep_spacing): diffusers' default, leading with steps_offset 0, never
starts few-step sampling at t = T-1 (K=1 samples at t = 0 only: the "sample" is the input noise); trailing
does. A new stage-1 model stores trailing; stage 2 and every command that reads a checkpoint keep the
checkpoint's own spacing (null) or take the configured one, and all of them sample through the one
Schedule, so a run's samplers, checkpoints, record and exported pipeline cannot disagree."""

import ast
import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from helpers import REPO, stage2_config

LEADING = {1: [0], 2: [500, 0], 4: [750, 500, 250, 0]}
TRAILING = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249]}


@contextlib.contextmanager
def samplers_used():
    """Records (timestep_spacing, timesteps) of every DDIM sampler whose timesteps are set inside."""
    from diffusers import DDIMScheduler

    seen, original = [], DDIMScheduler.set_timesteps

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append((self.config.timestep_spacing, [int(t) for t in self.timesteps]))
        return out

    with mock.patch.object(DDIMScheduler, "set_timesteps", spy):
        yield seen


def with_stored_spacing(ckpt: Path, dest: Path, spacing) -> Path:
    """A copy of an advdiff export whose stored scheduler config says `spacing` (None: no such key, as
    in a config stored before diffusers knew the field)."""
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    blob["scheduler"] = dict(blob["scheduler"])
    blob["scheduler"].pop("timestep_spacing", None)
    if spacing is not None:
        blob["scheduler"]["timestep_spacing"] = spacing
    dest.parent.mkdir(parents=True, exist_ok=True)
    blob["autoencoder"] = str((ckpt.parent / blob["autoencoder"]).resolve())  # absolute: it moved
    torch.save(blob, dest)
    return dest


class StubUNet(torch.nn.Module):
    """Outputs ones (a v prediction) and records the timesteps it is called at."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append(int(t))
        return SimpleNamespace(sample=torch.ones_like(x))


# -- the sampler's timesteps ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_step_timesteps_under_each_spacing(k):
    from trainer.diffusion.schedule import Schedule

    def timesteps(spacing):
        ddim = Schedule("cosine", 1000, "v_prediction", timestep_spacing=spacing).ddim()
        ddim.set_timesteps(k)
        return [int(t) for t in ddim.timesteps]

    assert timesteps("trailing") == TRAILING[k]
    assert timesteps("leading") == LEADING[k]  # the old default: never starts at t = T-1
    assert timesteps(None) == LEADING[k]  # a named schedule without a spacing keeps diffusers' default


def test_one_step_sampling_starts_at_the_last_timestep_only_under_trailing():
    """K=1 under leading runs the UNet at t=0 alone: the result is the input noise (to 1%); trailing
    runs it at t=999, where the output is the model's prediction of the clean latent."""
    from trainer.diffusion.sampling import ddim_sample
    from trainer.diffusion.schedule import Schedule

    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for spacing in ("leading", "trailing"):
        unet = StubUNet()
        ddim = Schedule("cosine", 1000, "v_prediction", timestep_spacing=spacing).ddim()
        out[spacing] = ddim_sample(unet, ddim, noise, 1)
        assert unet.calls == [TRAILING[1][0] if spacing == "trailing" else LEADING[1][0]]
    assert (out["leading"] - noise).abs().max() < 0.01  # the bug: no denoising at all
    assert (out["trailing"] - noise).abs().max() > 1
    assert torch.allclose(out["trailing"], -torch.ones_like(noise), atol=0.01)  # x0 = -v at t = T-1


def test_with_spacing_keeps_or_overrides_and_refuses_unknown_values():
    from trainer.config.sections_models import SchedulerConfig
    from trainer.diffusion.schedule import TIMESTEP_SPACINGS, Schedule, effective_spacing

    stored = Schedule("cosine", 1000, "v_prediction", timestep_spacing="trailing")
    assert stored.with_spacing(None) is stored and stored.to_dict()["timestep_spacing"] == "trailing"
    changed = stored.with_spacing("leading")
    assert changed.timestep_spacing == "leading" and stored.timestep_spacing == "trailing"
    assert {k: v for k, v in changed.to_dict().items() if k != "timestep_spacing"} == {
        k: v for k, v in stored.to_dict().items() if k != "timestep_spacing"
    }
    old = {k: v for k, v in stored.to_dict().items() if k != "timestep_spacing"}
    assert Schedule.from_dict(old).timestep_spacing == "leading"  # a config stored without the key
    assert effective_spacing(old, None) == "leading" and effective_spacing(old, "linspace") == "linspace"
    with pytest.raises(ValueError, match="timestep_spacing: expected one of leading, trailing, linspace"):
        stored.with_spacing("uniform")
    field = {f.name: f for f in SchedulerConfig.__dataclass_fields__.values()}["timestep_spacing"]
    assert tuple(field.metadata["choices"]) == TIMESTEP_SPACINGS and field.default is None


@pytest.mark.parametrize("how", ["set", "yaml"])
def test_a_bad_value_is_one_line_naming_the_field(how, tmp_path, capsys):
    from trainer.cli.main import main

    cfg = tmp_path / "c.yaml"
    data = {"experiment": {"name": "e", "save_path": "out"}}
    argv = ["--set", "scheduler.timestep_spacing=uniform"] if how == "set" else []
    if how == "yaml":
        data["scheduler"] = {"timestep_spacing": "uniform"}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["stage2", str(cfg), *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    expected = 'scheduler.timestep_spacing: expected one of leading, trailing, linspace, got "uniform"'
    assert err.splitlines() == [f"advdiff: error: {cfg}: {expected}"]


def test_every_ddim_sampler_comes_from_the_one_schedule():
    """Nothing in trainer/, models/ or bench/ builds a DDIMScheduler but Schedule.ddim(). Exceptions:
    models/schedules.py reads DDIM's config defaults (it samples nothing) and bench/generation.py's
    baseline is the loop a plain diffusers user writes, by design."""
    allowed = {"trainer/diffusion/schedule.py", "models/schedules.py", "bench/generation.py"}
    found = set()
    for root in ("trainer", "models", "bench"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    f = node.func
                    named = getattr(f, "id", None) == "DDIMScheduler" or (
                        isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "DDIMScheduler"
                    )
                    if named:
                        found.add(str(path.relative_to(REPO)))
    assert found <= allowed, sorted(found - allowed)
    assert "trainer/diffusion/schedule.py" in found


# -- stage 1: a new model ---------------------------------------------------------------------------------
def test_a_new_stage1_model_stores_trailing(stage1_ckpt):
    blob = torch.load(stage1_ckpt, map_location="cpu", weights_only=True)
    assert blob["config"]["scheduler"]["timestep_spacing"] is None  # the config left it null
    assert blob["scheduler"]["timestep_spacing"] == "trailing"
    pipeline = json.loads(
        (stage1_ckpt.parent / "pipeline" / "scheduler" / "scheduler_config.json").read_text()
    )
    assert pipeline["timestep_spacing"] == "trailing"


def test_stage1_takes_a_configured_spacing_and_a_resume_ignores_it(tmp_path, digits_manifest, small_ae):
    """A value is what the new model stores; it is no part of the resume fingerprint (training never
    samples), so a stage-1 run may resume under another spacing."""
    from helpers import tiny_config

    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    path = tiny_config(tmp_path, digits_manifest, small_ae)
    acc = build_accelerator("cpu")
    leading = DiffusionTrainer(load_config(path, {"scheduler.timestep_spacing": "leading"}), acc)
    default = DiffusionTrainer(load_config(path), acc)
    assert leading.schedule.timestep_spacing == "leading" and default.schedule.timestep_spacing == "trailing"
    assert leading.fingerprint == default.fingerprint


# -- commands that read a checkpoint ----------------------------------------------------------------------
def test_sample_keeps_the_checkpoints_spacing_unless_told(tmp_path, stage1_ckpt, capsys):
    """The same weights stored with leading (an old model) and trailing: `advdiff sample` samples each as
    stored, and --timestep_spacing trailing makes the old one sample exactly as the new one."""
    from trainer.cli.main import main

    old = with_stored_spacing(stage1_ckpt, tmp_path / "old" / "checkpoint.pt", None)

    def sample(ckpt, *flags):
        prefix = tmp_path / f"s{len(list(tmp_path.glob('s*.pt')))}"
        argv = ["sample", str(ckpt), "--out", str(prefix), "--num", "3", "--steps", "2", "--no_grid"]
        assert main([*argv, "--device", "cpu", *flags]) == 0
        line = capsys.readouterr().out
        return torch.load(f"{prefix}.pt", weights_only=True), line

    with samplers_used() as seen:
        new_null, line_new = sample(stage1_ckpt)
        old_null, line_old = sample(old)
        old_trailing, line_over = sample(old, "--timestep_spacing", "trailing")
        new_leading, _ = sample(stage1_ckpt, "--timestep-spacing", "leading")
    assert [s for s, _ in seen] == ["trailing", "leading", "trailing", "leading"]
    assert [t for _, t in seen] == [TRAILING[2], LEADING[2], TRAILING[2], LEADING[2]]
    assert "(trailing spacing)" in line_new and "(leading spacing)" in line_old
    assert "(trailing spacing)" in line_over
    assert torch.equal(old_trailing, new_null) and torch.equal(new_leading, old_null)
    assert not torch.allclose(old_null, new_null, atol=1e-3)


def test_export_writes_and_samples_with_the_spacing(tmp_path, stage1_ckpt):
    """The exported pipeline's scheduler config carries the spacing (the checkpoint's, or --timestep_spacing)
    and the trust_remote_code pipeline samples with it: what advdiff's own sampler samples."""
    from diffusers import DiffusionPipeline

    from trainer.cli.main import main
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.sampling import ddim_sample
    from trainer.diffusion.schedule import Schedule

    ck = load_diffusion_checkpoint(stage1_ckpt)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    got = {}
    for spacing in (None, "leading"):
        out = tmp_path / f"pipe_{spacing}"
        flags = ["--timestep_spacing", spacing] if spacing else []
        assert main(["export", str(stage1_ckpt), str(out), "--no_vae", "--steps", "2", *flags]) == 0
        stored = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert stored["timestep_spacing"] == (spacing or "trailing")
        pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
        with samplers_used() as seen:
            got[spacing] = pipe(latents=noise, output_type="latent").images
        assert seen == [(spacing or "trailing", (LEADING if spacing else TRAILING)[2])]
        want = ddim_sample(ck.unet, Schedule.from_dict(ck.scheduler).with_spacing(spacing).ddim(), noise, 2)
        assert torch.allclose(got[spacing], want, atol=1e-5)
    assert not torch.allclose(got[None], got["leading"], atol=1e-3)


def _stage2_cfg(tmp_path, digits_manifest, small_ae, ckpt, spacing, name="run"):
    path = stage2_config(
        tmp_path / name,
        digits_manifest,
        small_ae,
        ckpt,
        stage2={"num_samples": 16, "diffusion_max_steps": 2, "metric_samples": 8, "grid_samples": 2},
        discriminator={"max_steps": 2},
    )
    data = yaml.safe_load(path.read_text())
    data["scheduler"] = {"timestep_spacing": spacing}
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage2_keeps_the_models_spacing_or_takes_the_configs(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    """What stage 2 samples with (its setup's schedule) and records: the starting model's spacing under null,
    the configured one otherwise; a folder whose run recorded one spacing refuses another, and a run recorded
    before the field existed counts as having used its model's own."""
    from trainer.config.load import load_config
    from trainer.core.errors import UserError
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import setup
    from trainer.stage2.checks import load_stage1
    from trainer.stage2.run_record import SPACING, check_run_fields, record_run_fields, run_fields

    old = with_stored_spacing(stage1_ckpt, tmp_path / "old" / "checkpoint.pt", "leading")
    acc = build_accelerator("cpu")
    for ckpt, spacing, want in (
        (stage1_ckpt, None, "trailing"),
        (old, None, "leading"),
        (old, "trailing", "trailing"),
        (stage1_ckpt, "linspace", "linspace"),
    ):
        cfg = load_config(_stage2_cfg(tmp_path, digits_manifest, small_ae, ckpt, spacing, name="setup"))
        s = setup(cfg, acc, read_only=True)
        assert s.schedule.timestep_spacing == want, (ckpt, spacing)
        assert run_fields(cfg, s.facts.stage1)[SPACING] == want

    # a folder started with trailing on the old model: null (its leading) is refused, trailing resumes
    on = load_config(_stage2_cfg(tmp_path, digits_manifest, small_ae, old, "trailing"))
    record_run_fields(on, run_fields(on, load_stage1(on)))
    check_run_fields(on, load_stage1(on))
    null = load_config(_stage2_cfg(tmp_path, digits_manifest, small_ae, old, None))
    with pytest.raises(UserError) as e:
        check_run_fields(null, load_stage1(null))
    assert f'({SPACING}: "trailing" -> "leading")' in str(e.value)
    # a record written before the field: it sampled with the model's own (leading)
    record = Path(on.out_dir) / "stage2_run.json"
    data = json.loads(record.read_text())
    del data["fields"][SPACING]
    record.write_text(json.dumps(data))
    check_run_fields(null, load_stage1(null))
    with pytest.raises(UserError, match=f'{SPACING}: null -> "trailing"'):
        check_run_fields(on, load_stage1(on))


def test_evaluate_samples_as_the_measured_checkpoint_says(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capsys
):
    from trainer.cli.main import main

    old = with_stored_spacing(stage1_ckpt, tmp_path / "old" / "checkpoint.pt", "leading")
    cfg = _stage2_cfg(tmp_path, digits_manifest, small_ae, old, None)

    def row(*flags):
        with samplers_used() as seen:
            assert main(["evaluate", str(cfg), "--device", "cpu", "--generation_steps", "2", *flags]) == 0
        return json.loads(capsys.readouterr().out), {s for s, _ in seen}

    leading, seen_leading = row()
    trailing, seen_trailing = row("--timestep_spacing", "trailing")
    new, seen_new = row("--checkpoint", str(stage1_ckpt))  # a checkpoint that stores trailing
    assert (leading["timestep_spacing"], seen_leading) == ("leading", {"leading"})
    assert (trailing["timestep_spacing"], seen_trailing) == ("trailing", {"trailing"})
    assert (new["timestep_spacing"], seen_new) == ("trailing", {"trailing"})
    assert new["latent_fd"] == pytest.approx(trailing["latent_fd"])  # the same weights, the same sampler
    assert leading["latent_fd"] != pytest.approx(trailing["latent_fd"])


# -- stage 2 end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_stage2_samples_records_and_exports_one_spacing(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    """An old (leading) model fine-tuned with scheduler.timestep_spacing: trailing: every sampler of the run
    (fakes, rollouts, validation FD, summary, grids) is trailing, the run record, every checkpoint and the
    exported pipeline say trailing, and the pipeline samples with it."""
    from diffusers import DiffusionPipeline

    from trainer.config.load import load_config
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.sampling import ddim_sample
    from trainer.diffusion.schedule import Schedule
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import run

    old = with_stored_spacing(stage1_ckpt, tmp_path / "old" / "checkpoint.pt", "leading")
    cfg = load_config(_stage2_cfg(tmp_path, digits_manifest, small_ae, old, "trailing"))
    with samplers_used() as seen:
        run(cfg, build_accelerator("cpu"))
    assert len(seen) >= 5 and {s for s, _ in seen} == {"trailing"}, seen
    assert {tuple(t) for _, t in seen} == {(999, 666, 332)}  # K=3 from T-1
    out = Path(cfg.out_dir)
    assert (
        json.loads((out / "stage2_run.json").read_text())["fields"]["scheduler.timestep_spacing"]
        == "trailing"
    )
    ckpts = sorted((out / "checkpoints").glob("*.pt"))
    assert ckpts
    for path in ckpts:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        assert blob["scheduler"]["timestep_spacing"] == "trailing", path
    sched = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "trailing"
    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"), trust_remote_code=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    got = pipe(latents=noise, output_type="latent").images
    ck = load_diffusion_checkpoint(out / "pipeline")
    want = ddim_sample(ck.unet, Schedule.from_dict(ck.scheduler).ddim(), noise, 3)
    leading = ddim_sample(ck.unet, Schedule.from_dict(ck.scheduler).with_spacing("leading").ddim(), noise, 3)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, leading, atol=1e-3)


def test_the_bench_prints_both_spacings_side_by_side(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capsys
):
    import importlib.util

    spec = importlib.util.spec_from_file_location("spacing_bench", REPO / "bench" / "timestep_spacing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt)
    argv = ["--checkpoint", str(stage1_ckpt), "--config", str(cfg), "--steps", "1", "2", "--seeds", "1", "2"]
    with samplers_used() as seen:
        assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| K (DDIM steps) | leading: latent FD | trailing: latent FD | trailing / leading |" in out
    assert len([ln for ln in out.splitlines() if ln.startswith(("| 1 | ", "| 2 | "))]) == 2
    assert sorted({(s, tuple(t)) for s, t in seen}) == [
        ("leading", (0,)),
        ("leading", (500, 0)),
        ("trailing", (999,)),
        ("trailing", (999, 499)),
    ]
