"""The fine-tune's components in isolation: the critic registry, the one D step and the one guarded update
every helper steps with, the noising every critic's view shares, and best_metric's choices from the loss
terms' parts."""

from types import SimpleNamespace

import pytest
import torch
import yaml

from trainer.core.errors import UserError
from trainer.diffusion.noise import noised_between, noised_inputs
from trainer.diffusion.schedule import Schedule
from trainer.stage2 import registry  # noqa: F401  (registers the built-in critics and helpers)
from trainer.stage2.critic_step import critic_loss, guarded_update, r1_inputs
from trainer.stage2.critics import LatentCritic, critic_class
from trainer.stage2.feature_discriminator import FeatureCritic
from trainer.stage2.online import OnlineCritic
from trainer.training.losses import d_loss, r1_term


def _cfg(kind, mode):
    d = SimpleNamespace(config=SimpleNamespace(type=kind), training=SimpleNamespace(mode=mode))
    return SimpleNamespace(discriminator=d)


def test_the_registry_picks_the_critic_by_type_and_mode():
    assert critic_class(_cfg("latent", "offline")) is LatentCritic
    assert critic_class(_cfg("latent", "online")) is OnlineCritic
    assert critic_class(_cfg("unet_features", "offline")) is FeatureCritic
    assert LatentCritic.offline_phase and OnlineCritic.offline_phase and not FeatureCritic.offline_phase
    with pytest.raises(KeyError):
        critic_class(_cfg("unet_features", "online"))  # the config refuses it before any build


@pytest.mark.parametrize("kind", ["bce", "hinge"])
@pytest.mark.parametrize("r1_gamma", [0.0, 0.5])
def test_the_one_d_step_is_the_d_loss_with_r1_and_the_accuracy(kind, r1_gamma):
    td = SimpleNamespace(loss=kind, r1_gamma=r1_gamma)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    real, fake = torch.randn(5, 1, 4, 4), torch.randn(3, 1, 4, 4) + 1.0
    real_in = r1_inputs(td, real)
    assert real_in.requires_grad == (r1_gamma > 0) and torch.equal(real_in, real)
    logits = net(torch.cat([real_in, fake]))[:, 0]
    loss, accuracy = critic_loss(td, logits, real_in)
    expected = d_loss(kind, logits[:5], logits[5:])
    if r1_gamma:
        expected = expected + r1_gamma * r1_term(logits[:5], real_in)
    assert torch.allclose(loss, expected)
    right = int((logits[:5] > 0).sum()) + int((logits[5:] < 0).sum())
    assert float(accuracy) == pytest.approx(right / 8)
    loss.backward()  # R1's graph is differentiable (a double backward)
    assert net[1].weight.grad is not None


def test_the_guarded_update_skips_a_nonfinite_loss_and_steps_a_finite_one():
    from trainer.parallel.accelerator import build_accelerator

    accelerator = build_accelerator("cpu")
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = net.weight.detach().clone()
    bad = net(torch.ones(1, 3)).sum() * float("nan")
    assert not guarded_update(accelerator, accelerator, opt, net.parameters(), bad, 1.0, 1.0)
    assert torch.equal(net.weight, before) and net.weight.grad is None
    good = net(torch.ones(1, 3)).sum()
    assert guarded_update(accelerator, accelerator, opt, net.parameters(), good, 1.0, 0.0)
    assert torch.allclose(net.weight, before - 0.1)


def test_every_view_noises_through_one_function():
    schedule = Schedule("linear", 1000, "v_prediction")
    z = torch.randn(4, 4, 8, 8)
    a, ta = noised_inputs(schedule, z, [0, 5, 9, 2], 0.3, 7, "x")
    b, tb = noised_between(schedule, z, [0, 5, 9, 2], 0.0, 0.3, 7, "x")
    assert torch.equal(a, b) and torch.equal(ta, tb) and int(ta.max()) < 300
    c, tc = noised_between(schedule, z, [0, 5, 9, 2], 0.5, 0.6, 7, "x")
    assert int(tc.min()) >= 500 and int(tc.max()) < 600
    one, t1 = noised_between(schedule, z[1:2], [5], 0.5, 0.6, 7, "x")  # a sample's draw is its index's
    assert torch.equal(one, c[1:2]) and torch.equal(t1, tc[1:2])


def test_best_metric_choices_are_the_parts_the_run_logs(tmp_path):
    from trainer.config.load import load_config

    dm = {"type": "DistributionMatchingLoss", "key": "latent", "target": None, "weight": 1.0}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage2": {"best_metric": "val_dm"}}))
    with pytest.raises(UserError, match=r"stage2\.best_metric: expected one of val_loss, val_mse, val_adv, "):
        load_config(path)  # no distribution-matching term: val_dm is not logged
    loss = {"type": "CompositeLoss", "losses": [dm]}
    path.write_text(yaml.safe_dump({"stage2": {"best_metric": "val_dm"}, "training": {"loss": loss}}))
    assert load_config(path).stage2.best_metric == "val_dm"
    path.write_text(yaml.safe_dump({"stage2": {"best_metric": "val_nothing"}}))
    with pytest.raises(UserError, match=r"expected one of val_loss, .*val_dm, val_latent_fd, got"):
        load_config(path)
