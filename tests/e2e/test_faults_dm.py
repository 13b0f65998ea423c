"""kill -9 in the middle of a distribution-matching fine-tune (2 processes): inside a generator step between
two saved states (the fake score's updates and the generator's step both run there), and inside the atomic
write of the state that holds the generator, the fake score and their optimizers. Each rerun resumes at the
saved step (nothing finished is redone), and the finished run equals an uninterrupted one bit for bit: every
output file, and the fake score's weights and optimizer in the resume state.

tests/e2e/test_faults.py kills the default recipe at >= 10 random points of every phase; the points here are
fixed, and all of them fall in the phase that distribution matching adds to."""

import signal

import pytest
import torch
from fault_runs import (
    assert_same_outputs,
    check_no_redo,
    check_outputs_load,
    launch,
    progress,
    read_trace,
    temps,
)
from helpers import stage2_config

DM = {"type": "DistributionMatchingLoss", "key": "latent", "target": None, "weight": 1.0}
MSE = {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 0.25}
STATE = "checkpoints/t2_iter_0_checkpoint_latest.pt"


def dm_config(root, manifest, ae, ckpt):
    """One iteration, N=16, a 6-step fine-tune with a state every 2 steps; 2 fake-score updates per step,
    after a 2-update warm start on the saved fakes."""
    return stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        loss=[MSE, DM],
        stage2={
            "num_samples": 16,
            "num_iterations": 1,
            "diffusion_epochs": 6,  # 12 training reals, batch 8: one step per epoch
            "diffusion_eval_interval": 2,
            "generation_steps": 2,
            "rollout_grad_steps": 2,
            "rollout_batch_size": 4,
            "val_samples": 4,
            "grid_samples": 0,
            "metric_samples": 8,
            "distribution_matching": {"n_fake": 2, "batch_size": 4, "warm_start_steps": 2},
        },
        discriminator={"max_steps": 2},
    )


def kill_points(trace: list[str]) -> list[str]:
    """Inside the fourth generator step (step index 3; the state after 2 steps is saved), and inside the
    write of the state after 4 steps (written at the end of step index 3)."""
    state_write = [n for n in trace if n.startswith("partial:stage2_g0:3:") and n.endswith(STATE)]
    assert "step:stage2_g0:3" in trace and len(state_write) == 1, trace
    return ["step:stage2_g0:3", state_write[0]]


@pytest.mark.slow
def test_kill_inside_a_dm_fine_tune_resumes_bit_for_bit(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    ref_cfg = dm_config(tmp_path / "ref", digits_manifest, small_ae, stage1_ckpt)
    ref_log, ref_trace = tmp_path / "ref" / "log.txt", tmp_path / "ref" / "trace.txt"
    assert launch(ref_cfg, ref_log, ref_trace) == 0, ref_log.read_text()[-4000:]
    points = kill_points(read_trace(ref_trace))

    cfg = dm_config(tmp_path / "faulty", digits_manifest, small_ae, stage1_ckpt)
    out = tmp_path / "faulty" / "out"
    for i, point in enumerate(points + [None]):
        when = f"run {i} ({'killed at ' + point if point else 'to completion'})"
        before = progress(out)
        run_trace, log = tmp_path / "faulty" / f"trace_{i}.txt", tmp_path / "faulty" / f"log_{i}.txt"
        rc = launch(cfg, log, run_trace, at=point)
        seen = read_trace(run_trace)
        if point is None:
            assert rc == 0, f"{when}: exit {rc}:\n{log.read_text()[-3000:]}"
        else:
            assert rc == -signal.SIGKILL, f"{when}: exit {rc}:\n{log.read_text()[-3000:]}"
            assert seen and seen[-1] == point, f"{when}: the last point passed was {seen[-1:]}"
        if i > 0:  # both kills land after the state of step 2 and before the next one is whole
            assert before[0]["g_step"] == 2 and not before[0]["g_done"], (when, before[0])
        check_no_redo(before, seen, when)
        check_outputs_load(out, when)
    assert not temps(out), f"temp files left behind: {temps(out)}"
    assert_same_outputs(tmp_path / "ref" / "out", out)
    # the fake score and its optimizer, which the file comparison above does not read
    a = torch.load(tmp_path / "ref" / "out" / STATE, weights_only=True)["state"]["model"][
        "distribution_matching"
    ]
    b = torch.load(out / STATE, weights_only=True)["state"]["model"]["distribution_matching"]
    assert a["fake"].keys() == b["fake"].keys()
    for name in a["fake"]:
        assert torch.equal(a["fake"][name], b["fake"][name]), name
    moments = [(k, s) for k, s in a["optimizer"]["state"].items()]
    assert moments, "the fake score's optimizer holds no state"
    for key, state in moments:
        for field, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][field])
            ), (
                key,
                field,
            )
