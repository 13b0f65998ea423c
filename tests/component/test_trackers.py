"""Experiment trackers (`--report_to`): any tracker accelerate supports, checked before any compute; images
in each tracker's own form; one strictly increasing step for a whole run folder, the same after a resume;
and what TensorBoard and wandb (offline) actually recorded, read back with their own readers and compared
with the CSVs the run wrote."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_cli, stage2_config, write_config

from trainer.config.load import load_config
from trainer.core.errors import UserError
from trainer.parallel.accelerator import (
    flat_config,
    installed_trackers,
    log_images,
    resolve_report_to,
    stage2_phase_steps,
    tracker_names,
    tracker_step,
)


# -- --report_to: names, "all", what is missing ---------------------------------------------------------
def test_unknown_tracker_is_one_line_and_exit_2(tmp_path):
    cfg = write_config(tmp_path / "exp", save_path=str(tmp_path / "out"))
    proc = run_cli(
        "-m", "trainer.cli", "stage1", str(cfg), "--device", "cpu", "--report_to", "tensorboard,nosuch"
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advdiff: error: --report_to"), proc.stderr
    assert '"nosuch"' in lines[0] and "wandb" in lines[0] and "all" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written, nothing computed


def test_a_tracker_that_is_not_installed_names_what_to_install(tmp_path, capsys):
    from trainer.cli.stages import stage1_main

    missing = [n for n in tracker_names() if n not in installed_trackers()]
    if not missing:
        pytest.skip("every tracker accelerate supports is installed here")
    cfg = write_config(tmp_path / "exp", save_path=str(tmp_path / "out"))
    name = missing[0]
    assert stage1_main([str(cfg), "--device", "cpu", "--report_to", f"tensorboard,{name}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--report_to {name}: {name} is not installed" in err[0], err
    assert "pip install" in err[0]
    assert not (tmp_path / "out").exists()


def test_report_to_names():
    installed = installed_trackers()
    assert resolve_report_to(None) == [] and resolve_report_to("") == []
    assert resolve_report_to("all") == installed  # accelerate's "all": every installed tracker
    if {"tensorboard", "wandb"} <= set(installed):
        assert resolve_report_to(" wandb, tensorboard ,wandb") == ["wandb", "tensorboard"]
    for bad in ("tensorboard;wandb", "TensorBoard", ","):
        with pytest.raises(UserError, match="--report_to"):
            resolve_report_to(bad)
    assert {"tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive"} <= set(tracker_names())


def test_the_resolved_config_is_flat_scalars(tmp_path):
    cfg = load_config(
        write_config(tmp_path), {"training.seed": 7, "discriminator.training.betas": [0.5, 0.9]}
    )
    flat = flat_config(cfg)
    assert flat["training.seed"] == 7 and flat["experiment.name"] == "e"
    assert json.loads(flat["discriminator.training.betas"]) == [0.5, 0.9]
    assert "discriminator.training.learning_rate" in flat
    assert all(v is None or type(v) in (bool, int, float, str) for v in flat.values())


# -- images -------------------------------------------------------------------------------------------
class _Tracker:
    def __init__(self, name, takes_images=True):
        self.name, self.calls = name, []
        if takes_images:
            self.log_images = lambda values, step=None, **kwargs: self.calls.append((values, step, kwargs))


class _Acc:
    def __init__(self, trackers):
        self.trackers = trackers


@pytest.mark.parametrize("shape", [(6, 10), (6, 10, 3)])
def test_dataformats_reaches_tensorboard_only(shape):
    picture = np.arange(math.prod(shape), dtype=np.uint8).reshape(shape)
    trackers = {
        n: _Tracker(n) for n in ("tensorboard", "wandb", "swanlab", "aim", "clearml", "mlflow", "custom")
    }
    trackers["comet_ml"] = _Tracker("comet_ml", takes_images=False)
    log_images(_Acc(list(trackers.values())), "samples", picture, 17)

    ((values, step, kwargs),) = trackers["tensorboard"].calls
    assert step == 17 and kwargs == {"dataformats": "NHWC"}
    assert values["samples"].shape == (1, 6, 10, shape[2] if len(shape) == 3 else 1)
    assert np.array_equal(values["samples"].reshape(shape), picture)
    for name in ("wandb", "swanlab"):  # a list of pictures, as wandb.Image takes them
        ((values, step, kwargs),) = trackers[name].calls
        assert kwargs == {} and step == 17 and len(values["samples"]) == 1
        assert values["samples"][0] is picture
    for name in ("aim", "clearml"):  # one picture per key
        ((values, step, kwargs),) = trackers[name].calls
        assert kwargs == {} and step == 17 and values["samples"] is picture
    assert trackers["mlflow"].calls == [] and trackers["custom"].calls == []  # unknown forms: nothing


# -- one step for the whole run folder --------------------------------------------------------------
def _sequence(cfg, iterations: int) -> list[int]:
    """Every step a run folder logs at, in the order an uninterrupted run logs them."""
    d, g = stage2_phase_steps(cfg)
    steps = [tracker_step(cfg, "stage0", s) for s in range(1, cfg.autoencoder.training.max_steps + 1)]
    steps += [tracker_step(cfg, "stage1", s) for s in range(1, cfg.training.max_steps + 1)]
    for k in range(iterations):
        steps += [tracker_step(cfg, f"stage2_d{k}", s) for s in range(1, d + 1)]
        if k == 0:
            steps.append(tracker_step(cfg, "summary", 0))
        steps += [tracker_step(cfg, f"stage2_g{k}", s) for s in range(1, g + 1)]
        steps += [tracker_step(cfg, "samples", k), tracker_step(cfg, "summary", k + 1)]
    return steps


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"stage2.num_samples": 7, "discriminator.training.batch_size": 2, "training.batch_size": 64},
        {
            "discriminator.training.max_steps": 3,
            "stage2.diffusion_max_steps": 2,
            "autoencoder.training.max_steps": 1,
        },
    ],
)
def test_tracker_steps_increase_through_every_phase(tmp_path, overrides):
    cfg = load_config(write_config(tmp_path), overrides)
    steps = _sequence(cfg, 3)
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False)) and steps[0] == 1
    # the only steps never logged: iterations 1 and 2's copy of the slot of the stage-1 summary row
    d, g = stage2_phase_steps(cfg)
    origin = cfg.autoencoder.training.max_steps + cfg.training.max_steps
    unused = {origin + k * (d + g + 3) + d + 1 for k in (1, 2)}
    assert set(range(1, steps[-1] + 1)) - set(steps) == unused
    assert tracker_step(None, "stage2_g1", 5) == 5 and tracker_step(cfg, "toy", 5) == 5


def test_phase_steps_are_what_the_trainers_run(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    """stage2_phase_steps repeats the trainers' step count from the config alone; here it meets the
    trainers themselves, at sizes where rounding and caps matter."""
    import torch

    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.schedule import Schedule
    from trainer.files.layout import RunLayout
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.discriminator_trainer import DiscriminatorTrainer
    from trainer.stage2.finetune_trainer import FinetuneTrainer
    from trainer.stage2.generation import stratified_split

    acc = build_accelerator("cpu")
    base = load_diffusion_checkpoint(stage1_ckpt)
    schedule = Schedule.from_dict(base.scheduler)
    init = {"raw": base.blob["state_dict"], "ema": base.blob["state_dict"]}
    cases = [
        {"stage2": {"num_samples": 24}},
        {
            "stage2": {"num_samples": 13, "diffusion_epochs": 3},
            "discriminator": {"train_split": 0.55, "batch_size": 6},
        },
        {"stage2": {"num_samples": 30, "diffusion_max_steps": 2}, "discriminator": {"max_steps": 5}},
    ]
    for i, case in enumerate(cases):
        path = stage2_config(
            tmp_path / str(i),
            digits_manifest,
            small_ae,
            stage1_ckpt,
            stage2=case["stage2"],
            discriminator=case.get("discriminator"),
        )
        cfg = load_config(path)
        n = cfg.stage2.num_samples
        latents = torch.zeros(n, 4, 8, 8)
        real_train = stratified_split(n, cfg.discriminator.training.train_split, 1, 0, "real")
        fake_train = stratified_split(n, cfg.discriminator.training.train_split, 1, 0, "fake")
        layout = RunLayout.of(cfg)
        d = DiscriminatorTrainer(
            acc, cfg, 0, layout, latents, latents, real_train, fake_train, schedule=schedule
        )
        g = FinetuneTrainer(acc, cfg, 0, layout, base, schedule, small_ae, latents, real_train, d.d, init)
        assert stage2_phase_steps(cfg) == (d.max_steps, g.max_steps), case


# -- end to end: what TensorBoard and wandb recorded ---------------------------------------------------
def _numeric_columns(path):
    """{column: [(the row, value), ...]} of every numeric column of a CSV, as written. "nan" counts as no
    value: the summary CSV's rewrite (evaluation.record) turns an earlier row's empty cell into "nan"."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for col in rows[0]:
        cells = [(r, r[col]) for r in rows if r[col] not in ("", "nan")]
        try:
            out[col] = [(r, float(v)) for r, v in cells]
        except ValueError:
            continue
        if not cells:
            del out[col]
    return out


def _tensorboard(logdir):
    """{tag: [(step, value), ...]} of every scalar, and {tag: [step, ...]} of every image, from all the
    event files of one TensorBoard run folder (every process that logged to it, in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    images = {t: [e.step for e in ea.Images(t)] for t in ea.Tags()["images"]}
    return scalars, images


def _wandb(folder):
    """The records of every offline wandb run under `folder`, read with wandb's own reader (`wandb leet
    inspect --json`), run after run in the order they started: (config updates, history records)."""
    runs = []
    for path in sorted(folder.rglob("run-*.wandb")):
        proc = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        start = next(r["run"]["start_time"] for r in records if r["type"] == "run")
        updates = [r["run"].get("config", {}) for r in records if r["type"] == "run"]
        updates += [r["config"] for r in records if r["type"] == "config"]  # accelerate's config.update
        config = {k: v for u in updates for k, v in u.get("update", {}).items()}
        runs.append((start, config, [r["history"] for r in records if r["type"] == "history"]))
    runs.sort(key=lambda r: r[0])
    config = {k: v for _, c, _ in runs for k, v in c.items()}
    history = [(int(h["step"]["num"]), h["item"]) for _, _, hs in runs for h in hs]
    return config, history


def _close(a: float, b: float) -> bool:
    """A tracker's value vs the CSV's (6 significant digits; TensorBoard keeps float32)."""
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


@pytest.mark.slow
def test_tensorboard_and_wandb_hold_every_csv_column_at_one_increasing_step(
    tmp_path, monkeypatch, digits_manifest, small_ae, stage1_ckpt
):
    """One stage-2 iteration (the D phase, the stage-1 summary row, the fine-tune phase, the grid and the
    iteration's summary row), stopped inside the fine-tune phase and resumed: two processes, two wandb
    runs and two TensorBoard event files, which together must read like one uninterrupted run."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    cfg_path = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt)
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }
    monkeypatch.delenv("WANDB_DIR", raising=False)  # without it, wandb's files go under <save_path>/tracking
    args = [
        "-m",
        "trainer.cli",
        "stage2",
        str(cfg_path),
        "--device",
        "cpu",
        "--report_to",
        "tensorboard,wandb",
        "--set",
        "discriminator.training.epochs=1",
        "--set",
        "stage2.metric_samples=48",
    ]
    first = run_cli(*args, "--stop_after_steps", "1", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped inside iteration 0" in first.stdout + first.stderr
    second = run_cli(*args, env=env)
    assert second.returncode == 0, second.stderr[-3000:]

    cfg = load_config(cfg_path, {"discriminator.training.epochs": 1, "stage2.metric_samples": 48})
    out = cfg.out_dir
    sources = {
        out / "discriminator_iter_0" / "discriminator_history.csv": "stage2_d0",
        out / "t2_metrics_iter_0.csv": "stage2_g0",
        out / "t2_summary.csv": "summary",
    }
    written = {p for p in out.rglob("*.csv") if p.name != "timings.csv"}  # timings: wall clock, not a metric
    assert written == set(sources), written ^ set(sources)

    tb_scalars, tb_images = _tensorboard(out / "tracking" / "t2")
    wb_config, wb_history = _wandb(out / "tracking" / "wandb")
    assert len({p.parent for p in (out / "tracking" / "wandb").rglob("run-*.wandb")}) == 2  # one per process

    # steps: strictly increasing in wandb's rows and in every TensorBoard stream
    wb_steps = [s for s, _ in wb_history]
    assert wb_steps == sorted(set(wb_steps)), wb_steps
    for tag, series in tb_scalars.items():
        steps = [s for s, _ in series]
        assert steps == sorted(set(steps)), (tag, steps)

    # every numeric column of every CSV, in both trackers, the same series at the steps the layout says
    d, g = stage2_phase_steps(cfg)
    checked = 0
    for path, stage in sources.items():
        for col, cells in _numeric_columns(path).items():
            if col in ("step", "iteration"):  # the row's position: the trackers' step
                continue
            if stage == "summary":
                expected = [(tracker_step(cfg, stage, int(r["iteration"])), v) for r, v in cells]
            else:
                expected = [(tracker_step(cfg, stage, int(r["step"])), v) for r, v in cells]
            tag = f"{stage}/{col}"
            got_tb = tb_scalars.get(tag)
            got_wb = [(s, float(item[tag])) for s, item in wb_history if tag in item]
            for got in (got_tb, got_wb):
                assert got is not None and [s for s, _ in got] == [s for s, _ in expected], (
                    tag,
                    got,
                    expected,
                )
                assert all(_close(a, b) for (_, a), (_, b) in zip(got, expected, strict=False)), (
                    tag,
                    got,
                    expected,
                )
            checked += 1
    assert checked >= 25
    # the phases end where the layout's next phase begins: the trainers ran the steps it reserves
    with open(out / "t2_metrics_iter_0.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["step"]) == g
    with open(out / "discriminator_iter_0" / "discriminator_history.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["step"]) == d

    # the grid: in TensorBoard and wandb, at its own step between the fine-tune and the summary row
    grid_step = tracker_step(cfg, "samples", 0)
    assert tb_images.get("samples") == [grid_step], tb_images
    (wb_grid,) = [item for s, item in wb_history if s == grid_step]
    assert wb_grid["samples._type"] == "images/separated" and wb_grid["samples.count"] == 1

    # the resolved config, flat: the YAML's values and the command line's --set
    assert wb_config["stage2.num_samples"] == 24 and wb_config["discriminator.training.epochs"] == 1
    assert wb_config["experiment.name"] == "t2"
