"""Determinism on CPU: the same config and seed give bit-identical fakes, reals, D history, metrics,
summary and weights; a different seed does not (so the comparison can fail). The same fakes at 1 and 2
processes is tested in e2e/test_two_processes.py (test_two_processes_match_one_and_only_main_writes); see
docs/REPRODUCIBILITY.md for what holds on GPU."""

import csv

import pytest
import torch
from helpers import run_stage2, stage2_config

pytestmark = pytest.mark.slow  # three 2-iteration stage-2 runs

WALL_CLOCK = {"seconds"}  # the only columns allowed to differ between two runs


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in csv.DictReader(f)]


def _config(root, manifest, ae, ckpt):
    return stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        stage2={
            "num_samples": 16,
            "num_iterations": 2,
            "diffusion_max_steps": 3,
            "diffusion_eval_interval": 2,
            "metric_samples": 8,
            "grid_samples": 0,
        },
        discriminator={"max_steps": 4, "eval_interval": 2, "r1_gamma": 0.5},
    )


def _compare(a, b):
    """Everything two runs wrote, compared exactly; returns the list of differing outputs."""
    differ = []
    for k in range(2):
        for name in ("fake_latents.pt", "real_latents.pt"):
            if not torch.equal(
                torch.load(a / f"discriminator_iter_{k}" / name),
                torch.load(b / f"discriminator_iter_{k}" / name),
            ):
                differ.append(f"iter {k} {name}")
        da = torch.load(a / f"discriminator_iter_{k}" / "discriminator_best.pt")["state_dict"]
        db = torch.load(b / f"discriminator_iter_{k}" / "discriminator_best.pt")["state_dict"]
        if any(not torch.equal(da[n], db[n]) for n in da):
            differ.append(f"iter {k} discriminator weights")
        ga = torch.load(a / "checkpoints" / f"t2_iter_{k}_checkpoint_latest.pt", weights_only=True)[
            "state_dict"
        ]
        gb = torch.load(b / "checkpoints" / f"t2_iter_{k}_checkpoint_latest.pt", weights_only=True)[
            "state_dict"
        ]
        if any(not torch.equal(ga[n], gb[n]) for n in ga):
            differ.append(f"iter {k} diffusion weights")
        for csv_name in (f"discriminator_iter_{k}/discriminator_history.csv", f"t2_metrics_iter_{k}.csv"):
            if _rows(a / csv_name) != _rows(b / csv_name):
                differ.append(csv_name)
    if _rows(a / "t2_summary.csv") != _rows(b / "t2_summary.csv"):
        differ.append("t2_summary.csv")
    return differ


def test_same_config_and_seed_give_identical_outputs(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    a = run_stage2(_config(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt))
    b = run_stage2(_config(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt))
    assert len(_rows(a / "discriminator_iter_1" / "discriminator_history.csv")) >= 2
    assert len(_rows(a / "t2_summary.csv")) == 3  # stage 1 + two iterations
    assert _compare(a, b) == []

    # the comparison can fail: another seed changes every output it compares
    c = run_stage2(
        _config(tmp_path / "c", digits_manifest, small_ae, stage1_ckpt), overrides={"training.seed": 7}
    )
    differ = _compare(a, c)
    assert "iter 0 fake_latents.pt" in differ and "iter 0 real_latents.pt" in differ
    assert "iter 1 diffusion weights" in differ and "t2_summary.csv" in differ
