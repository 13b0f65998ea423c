"""The leaner generator step (docs/STAGE2.md#the-generator-step): the noised reals left out where no term
reads them (stage2.real_batch), one fake-score update on the generator step's own samples
(stage2.distribution_matching.reuse_generator_samples) and backward simulation at K > 1
(stage2.backward_simulation); each resumes exactly and is in the fingerprint. 2 processes against 1:
e2e/test_two_processes.py."""

import pandas as pd
import torch
from helpers import finetune_alone, fit_alone, stop_then_resume
from test_distribution_matching import DM, MSE, _config, _latest

from trainer.core.seeds import derive_seed
from trainer.diffusion.noise import per_sample_noise
from trainer.diffusion.sampling import ddim_step

LEAN = {
    "generation_steps": 3,
    "backward_simulation": True,
    "rollout_grad_steps": 1,
    "distribution_matching": {"n_fake": 2, "reuse_generator_samples": True},
}


def _forward_batches(trainer):
    """Record the batch size of each wrapped generator forward."""
    sizes, forward = [], trainer.ddp_unet.forward

    def spy(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return forward(x, *args, **kwargs)

    trainer.ddp_unet.forward = spy
    return sizes


def test_unread_reals_are_left_out_of_the_step_and_change_nothing(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    runs = {}
    for mode in ("auto", "always"):
        cfg = _config(tmp_path / mode, digits_manifest, small_ae, stage1_ckpt, real_batch=mode)
        trainer = finetune_alone(cfg)
        sizes = _forward_batches(trainer)
        loss, parts, n = trainer.compute_loss(0)
        runs[mode] = (float(loss.detach()), parts, n, sizes, trainer.fingerprint)
    (loss_a, parts_a, n_a, sizes_a, fp_a), (loss_b, parts_b, n_b, sizes_b, fp_b) = runs.values()
    # the step's one wrapped forward (the last; the rollout's first step runs before it): the 4 rollouts
    # alone, or behind the batch of 8 reals
    assert sizes_a[-1] == 4 and sizes_b[-1] == 8 + 4 and sizes_a[:-1] == sizes_b[:-1]
    assert n_a == n_b == 8  # the step's weight is the batch's either way
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_b) and parts_a.keys() == parts_b.keys()
    assert all(abs(parts_a[k] - parts_b[k]) <= 1e-5 * max(abs(parts_b[k]), 1e-8) for k in parts_a)
    assert "real_batch" not in fp_a and fp_b["real_batch"] == "always"
    # a term that reads the reals keeps them
    cfg = _config(tmp_path / "mse", digits_manifest, small_ae, stage1_ckpt, loss=(MSE, DM))
    trainer = finetune_alone(cfg)
    sizes = _forward_batches(trainer)
    trainer.compute_loss(0)
    assert sizes[-1] == 8 + 4


def test_the_last_fake_score_update_trains_on_the_generator_steps_own_samples(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    cfg = _config(tmp_path, digits_manifest, small_ae, stage1_ckpt, **LEAN)
    trainer = finetune_alone(cfg)
    dm = trainer.helper("distribution_matching")
    assert dm.batch == 4  # reuse: the fake score's batch is the generator's rollout batch
    seen, update = [], dm.update

    def spy(x0, idx, parts, weight, draw=0, y=None):
        seen.append((x0.clone(), list(idx), parts, draw, len(trainer.step_samples)))
        return update(x0, idx, parts, weight, draw, y)

    dm.update = spy
    logs = trainer.train_step(0)
    assert [s[3] for s in seen] == [0, 1]  # n_fake = 2 draws: one before the step, one after it
    assert seen[0][4] == 0 and seen[1][4] == 1  # the second once the step has made its samples
    (own,) = trainer.step_samples
    assert torch.equal(seen[1][0], own.sample.float()) and seen[1][1] == own.index == [0, 1, 2, 3]
    assert not torch.equal(seen[0][0], seen[1][0])  # the first: a fresh rollout of its own draw
    assert seen[1][2] == (trainer.seed, trainer.stage, "fake-score", 0, 1)
    assert set(logs) >= {"fake_loss", "dm"} and logs["fake_loss"] > 0


def test_backward_simulation_stops_at_a_drawn_step_and_takes_its_x0_prediction(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    cfg = _config(tmp_path, digits_manifest, small_ae, stage1_ckpt, **LEAN)
    trainer = finetune_alone(cfg)
    rollouts, model, idx = trainer.rollouts, trainer.model(), [0, 1, 2]
    stops = set()
    for draw in range(6):
        parts = (trainer.seed, "test", draw)
        with torch.no_grad():
            got = rollouts.sample(model, idx, parts, 3, backsim=True)
            j = derive_seed(*parts, "backward-simulation") % 3
            ddim = trainer.schedule.ddim()
            ddim.set_timesteps(3)
            x = per_sample_noise(idx, trainer.latent_shape, *parts)
            for t in list(ddim.timesteps)[:j]:
                x = ddim_step(ddim, model(x, t).sample, t, x, 0.0, None)
            t = ddim.timesteps[j]
            expected = trainer.schedule.predictions(model(x, t).sample, x, t.reshape(1).expand(3))[1]
        assert torch.allclose(got, expected, atol=1e-6), draw
        stops.add(j)
    assert len(stops) > 1  # the stop varies with the batch's draw
    with torch.no_grad():  # validation's rollouts still run all K steps
        full = rollouts.sample(model, idx, parts, 3)
    assert not torch.allclose(full, got) or j == 2


def test_the_lean_step_resumes_bit_for_bit_and_is_in_the_fingerprint(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    straight = fit_alone(_config(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt, **LEAN))
    a = _latest(tmp_path / "a" / "out")
    fingerprint = a["state"]["fingerprint"]
    assert fingerprint["backward_simulation"] is True
    assert fingerprint["distribution_matching"]["reuse_generator_samples"] is True
    cfg_b = _config(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt, **LEAN)
    first, resumed = stop_then_resume(cfg_b, 1, run=fit_alone)
    assert first.step == 1
    b = _latest(tmp_path / "b" / "out")
    for key in ("state_dict", "raw_state_dict"):
        for p in a[key]:
            assert torch.equal(a[key][p], b[key][p]), (key, p)
    fake_a, fake_b = (x["state"]["model"]["distribution_matching"]["fake"] for x in (a, b))
    assert all(torch.equal(fake_a[p], fake_b[p]) for p in fake_a)
    ha = pd.read_csv(straight.history_path).drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, pd.read_csv(resumed.history_path).drop(columns="seconds"))
    assert ha["train_fake_loss"].notna().all()
