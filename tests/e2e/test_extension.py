"""Extending the fine-tune from outside the project: this file alone defines a new critic (a small conv net
on the latents that trains before every generator step) and a new generator term with its own small
network and state, registers both through the public hooks, and runs a 2-process fine-tune with them that
stops and resumes exactly. No project file names either; they show up in the history's columns, the
resume fingerprint, the resume state and the iteration's files.

Run as a script (`accelerate launch tests/e2e/test_extension.py CONFIG ...`) it registers them and runs the
stage2 command: the workers of a launch import nothing of the test session.
"""

import contextlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from trainer.config.critic_types import accept_critic_type
from trainer.files import atomic
from trainer.parallel import engine
from trainer.parallel.collectives import shard_range
from trainer.stage2.critic_step import guarded_update
from trainer.stage2.critics import Critic, register_critic
from trainer.stage2.helpers import Helper, register_helper
from trainer.training.loop import local_weight
from trainer.training.losses import Term, register_term

HERE = Path(__file__).resolve()


def _small_net(seed: int, out: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if out == 1:  # a critic: one logit per latent
            layers = [torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1)]
            return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(8, 1))
        return torch.nn.Conv2d(4, out, 1)


@contextlib.contextmanager
def _no_grad_params(net):
    net.requires_grad_(False)
    try:
        yield
    finally:
        net.requires_grad_(True)


class _Trained(Helper):
    """What both extensions share: a small network behind the run's second wrapper, its state and file."""

    def _setup(self, ctx, net, batch):
        self.main, self.batch = ctx.accelerator, batch
        self.path = ctx.layout.iteration_folder(ctx.k) / f"{self.state_key}.pt"
        net = net.to(ctx.accelerator.device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        self.acc, self.wrapped, self.opt = engine.prepare_second(ctx.accelerator, net, opt, batch, 0.0)
        self.net = net

    def frozen(self):
        return _no_grad_params(self.net)

    def state(self, run):
        return {"net": engine.state_dict(self.acc, self.net), "optimizer": self.opt.state_dict()}

    def load_state(self, state, run):
        if state is None:
            raise run.missing_state(f"the {self.name}")
        engine.load_state_dict(self.acc, self.net, state["net"])
        self.opt.load_state_dict(state["optimizer"])

    def export(self, run):
        weights = engine.state_dict(self.acc, self.net)
        if self.main.is_main_process:
            atomic.save_torch({"net": weights, "step": run.step}, self.path)

    def _update(self, loss, n_local):
        weight = local_weight(n_local, self.batch, self.main.num_processes)
        guarded_update(self.main, self.acc, self.opt, self.wrapped.parameters(), loss, weight, 0.0)


class ProbeCritic(Critic, _Trained):
    """The critic: real vs the generator's rollouts, one update before each generator step."""

    name, state_key, columns = "discriminator", "probe_critic", ["train_probe_loss"]

    def __init__(self, ctx):
        self._setup(ctx, _small_net(7, 1), batch=4)

    @classmethod
    def build(cls, ctx, d):
        return cls(ctx)

    @classmethod
    def fingerprint_of(cls, cfg):
        return {"probe_critic": {"width": 8, "lr": 1e-2}}

    def view(self, sample, idx, *parts):
        return sample, None

    def __call__(self, z, t, y=None):
        return self.net(z.float())[:, 0]

    def pre_step(self, step, inputs):
        mine = list(shard_range(self.batch, self.main.process_index, self.main.num_processes))
        with torch.no_grad():
            fake = inputs.samples.train_sample(inputs.model, mine, (inputs.seed, inputs.stage, "probe", step))
        real, _ = inputs.reals(len(mine), step)
        logits = self.wrapped(torch.cat([real, fake.float()]))[:, 0]
        n = len(mine)
        loss = F.softplus(-logits[:n]).mean() + F.softplus(logits[n:]).mean()
        self._update(loss, 2 * n)
        return {"probe_loss": float(loss.detach())}


class AnchorNet(_Trained):
    """The term's own network: a 1x1 conv fit, before each generator step, to map reals onto themselves."""

    name = state_key = "anchor_net"
    columns = ["train_anchor_fit"]

    def __init__(self, ctx):
        self._setup(ctx, _small_net(11, 4), batch=4)

    @classmethod
    def build(cls, ctx):
        return cls(ctx)

    @classmethod
    def fingerprint_of(cls, cfg):
        return {"anchor_net": {"kernel": 1, "lr": 1e-2}}

    def pre_step(self, step, inputs):
        n = len(shard_range(self.batch, self.main.process_index, self.main.num_processes))
        real, _ = inputs.reals(n, 1000 + step)
        loss = F.mse_loss(self.wrapped(real), real)
        self._update(loss, n)
        return {"anchor_fit": float(loss.detach())}

    def target(self, x):
        with torch.no_grad():
            return self.net(x.float())


class AnchorLoss(Term):
    """The generator's one-step prediction pulled toward the anchor net's image of the real latent."""

    part, helper = "anchor", "anchor_net"
    keys, targets = ("pred_latent",), ("latent",)

    def per_sample(self, outputs, ctx):
        target = ctx[self.helper].target(outputs[self.target])
        return ((outputs[self.key].float() - target) ** 2).flatten(1).mean(1)


def register():
    accept_critic_type("probe")
    register_critic("probe", "offline", ProbeCritic)
    register_helper("anchor_net", AnchorNet)
    register_term(AnchorLoss)


LOSS = [
    {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 1.0},
    {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.1},
    {"type": "AnchorLoss", "key": "pred_latent", "target": "latent", "weight": 0.5},
]


def _config(root, manifest, ae, ckpt):
    from helpers import stage2_config  # here, not at the top: the workers run this file as a script

    stage2 = {"diffusion_max_steps": 4, "diffusion_eval_interval": 2, "grid_samples": 0, "metric_samples": 12}
    path = stage2_config(root, manifest, ae, ckpt, stage2=stage2, loss=LOSS)
    data = yaml.safe_load(path.read_text())
    data["discriminator"]["config"]["type"] = "probe"
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(cfg, *extra):
    from helpers import accelerate_launch

    proc = accelerate_launch(2, str(HERE), str(cfg), "--device", "cpu", *extra, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_critic_and_a_term_from_outside_train_stop_and_resume_exactly_at_2_processes(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    straight = _config(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt)
    resumed = _config(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt)
    _launch(straight)
    first = _launch(resumed, "--stop_after_steps", "2")
    assert "stopped inside iteration 0" in first.stdout
    second = _launch(resumed)
    assert "at step 2/4" in second.stdout

    roots = (tmp_path / "a" / "out", tmp_path / "b" / "out")
    a, b = (torch.load(r / "checkpoints/t2_iter_0_checkpoint_latest.pt", weights_only=True) for r in roots)
    for key in ("raw_state_dict", "state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for name in ("probe_critic", "anchor_net"):
        net_a, net_b = a["state"]["model"][name]["net"], b["state"]["model"][name]["net"]
        assert all(torch.equal(net_a[k], net_b[k]) for k in net_a), name
        assert name in a["state"]["fingerprint"]
        files = [torch.load(r / "discriminator_iter_0" / f"{name}.pt", weights_only=True) for r in roots]
        assert files[0]["step"] == 4
        assert all(torch.equal(files[0]["net"][k], files[1]["net"][k]) for k in net_a)
    start = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(start[k], a["raw_state_dict"][k]) for k in start)  # the generator moved

    histories = [pd.read_csv(r / "t2_metrics_iter_0.csv") for r in roots]
    for column in ("train_probe_loss", "train_anchor_fit", "train_anchor", "val_anchor", "train_adv"):
        assert histories[0][column].notna().all(), column
    pd.testing.assert_frame_equal(histories[0].drop(columns="seconds"), histories[1].drop(columns="seconds"))


if __name__ == "__main__":
    from trainer.cli.stages import stage2_main

    register()
    sys.exit(stage2_main())
