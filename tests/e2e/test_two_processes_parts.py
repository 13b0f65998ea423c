"""Stage 1, gradient accumulation and the quality metrics at 2 CPU processes against 1. Moved here from
test_stage1, test_memory_switches, test_metrics and test_conditional_metrics (whose builders they use)."""

import json

import pytest
import test_conditional_metrics as conditional_metrics
import test_memory_switches as memory
import test_metrics as metrics
import torch
from helpers import accelerate_launch, stage2_config, tiny_config
from test_memory_switches import FAST, GRAD_ATOL, UPDATE_RTOL, _gradient_error, _update_error
from test_stage1 import _launch, _weights

plain_stage1 = memory.plain_stage1  # the module fixture: one 1-process stage-1 reference for this file


@pytest.mark.slow
def test_accelerate_launch_1_and_2_processes(tmp_path, digits_manifest, small_ae):
    _, _, one = _launch(tmp_path / "p1", digits_manifest, small_ae, 1)
    proc, audit, two = _launch(tmp_path / "p2", digits_manifest, small_ae, 2)
    assert (audit / "rank1.txt").read_text() == "", "a non-main process wrote files"
    assert proc.stdout.count("eval at step 12") == 1  # status lines from the main process only
    # Same data, same per-sample noise, the global batch split across ranks: the 2-process result
    # matches the 1-process one up to floating-point summation order.
    a, b = _weights(one / "checkpoint_latest.pt"), _weights(two / "checkpoint_latest.pt")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_two_processes_with_accumulation(tmp_path, digits_manifest, small_ae, plain_stage1):
    """DDP at 2 processes, 2 micro-batches each (no_sync on the first): the 1-process plain update, up to
    the summation order of the all-reduce."""
    import yaml

    cfg = tiny_config(tmp_path, digits_manifest, small_ae, **{**FAST, "gradient_accumulation_steps": 2})
    assert yaml.safe_load(cfg.read_text())["training"]["batch_size"] == 16
    proc = accelerate_launch(2, "-m", "trainer.stage1", str(cfg), "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(tmp_path / "out" / "stage1" / "state.pt", map_location="cpu", weights_only=True)
    two = {"weights": state["model"]["unet"], "optimizer": state["model"]["optimizer"]}
    assert _gradient_error(plain_stage1, two) <= GRAD_ATOL and _update_error(plain_stage1, two) <= UPDATE_RTOL


@pytest.mark.slow
def test_two_processes_finetune_with_accumulation(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    """The stage-2 fine-tune under DDP at 2 processes (rollouts back-propagated through 2 steps, the first on
    the unwrapped UNet): 2 micro-batches per process make the update of 1 (its draws are per process, so the
    reference is the 2-process plain run, not a 1-process one)."""
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    runs = {}
    for micro in (1, 2):
        root = tmp_path / f"n{micro}"
        cfg = stage2_config(
            root,
            digits_manifest,
            small_ae,
            stage1_ckpt,
            stage2={
                "num_samples": 37,
                "diffusion_max_steps": 2,
                "rollout_grad_steps": 2,
                "grid_samples": 0,
                "metric_samples": 12,
            },
        )
        proc = accelerate_launch(
            2,
            "-m",
            "trainer.stage2",
            str(cfg),
            "--device",
            "cpu",
            "--set",
            f"training.gradient_accumulation_steps={micro}",
            "--set",
            "training.max_grad_norm=0",
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        blob = torch.load(
            root / "out" / "checkpoints" / "t2_iter_0_checkpoint_latest.pt",
            map_location="cpu",
            weights_only=True,
        )
        runs[micro] = {
            "weights": blob["raw_state_dict"],
            "optimizer": blob["state"]["model"]["optimizer"],
            "start_weights": load_diffusion_checkpoint(stage1_ckpt).weights,
        }
    assert _gradient_error(runs[1], runs[2]) <= GRAD_ATOL
    assert _update_error(runs[1], runs[2]) <= UPDATE_RTOL


@pytest.mark.slow
def test_metrics_are_the_same_at_1_and_2_processes(tmp_path):
    script = tmp_path / "m.py"
    script.write_text(metrics.SCRIPT)
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        proc = accelerate_launch(nproc, str(script), str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(out.read_text()))
    assert results[0]["fd"] == pytest.approx(results[1]["fd"], rel=1e-9)
    for key in ("cls_fd", "lo", "hi"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), key
    assert results[0]["lo"] < results[0]["cls_fd"] < results[0]["hi"]
    assert results[0]["p"] == results[1]["p"] and results[0]["r"] == results[1]["r"]


@pytest.mark.slow
def test_conditional_evaluator_is_the_same_at_1_and_2_processes(tmp_path, digits_manifest):
    path, _ = conditional_metrics._hand_made_classifier(tmp_path, k=conditional_metrics.CLASSES)
    script = tmp_path / "cc.py"
    script.write_text(conditional_metrics.SCRIPT)
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        proc = accelerate_launch(
            nproc, str(script), str(tmp_path / f"run{nproc}"), str(digits_manifest), str(path), str(out)
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(out.read_text()))
    one, two = results
    assert one["labels"] == two["labels"] and len(one["labels"]) == 120
    assert one["fakes"] == pytest.approx(two["fakes"], rel=1e-6, abs=1e-6)
    assert one["guidance_scale"] == two["guidance_scale"] == conditional_metrics.SCALE
    for key in ("class_fd", "label_fidelity", "cls_fd", "latent_fd"):
        assert one[key] == pytest.approx(two[key], rel=1e-6), key
    assert one["class_fd"] > 0 and 0 <= one["label_fidelity"] <= 1
