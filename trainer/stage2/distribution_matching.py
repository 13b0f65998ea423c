"""The two scores behind a DistributionMatchingLoss term (docs/STAGE2.md#distribution-matching).

The real score is the frozen stage-1 teacher: the EMA weights of the stage-1 checkpoint the run started
from (the same teacher in every iteration), in eval mode, never trained. The fake score is a trainable copy
of it that tracks the generator: before each generator step it takes `n_fake` denoising steps (the stage-1
objective, t uniform over the schedule) on fresh K-step samples of the current weights, made without
gradient. The generator's signal is the difference of the two scores' x0 predictions on its own samples,
noised to a level in [t_min, t_max) x num_steps (trainer/training/losses.py, distribution_matching_loss).

Every draw is per sample index, from (seed, stage, step, update, index), so the fake score's samples, their
noise and timesteps are the same at any world size and after any resume. Under DDP the fake score is a
second DDP module of the same Accelerator, as the online discriminator is (stage2/online.py), and under
DeepSpeed a second engine behind a second Accelerator (engine.prepare_second), which the online D would need
too: that combination is refused before any compute. Its weights and optimizer are part of the fine-tune's
resume state (under DeepSpeed the optimizer partitions are in the engine's own checkpoint beside it).

With a critic that lives on the fake score (critics.py: a critic whose `host` is "fake_score", the feature
discriminator of stage2/feature_discriminator.py) the trained module is the fake score with the critic's
classifier head on its bottleneck: one module, one wrapper, one optimizer (the head in its own parameter
group), the head's loss added to each update's denoising loss.

It is the helper (stage2/helpers.py) of the DistributionMatchingLoss term: built from the fine-tune's
context, it warm-starts, takes its n_fake steps before each generator step, and saves and loads itself.

A class-conditional run's scores take each sample's label: the teacher at stage2.guidance_scale (the scale
the generator's rollouts sample at), the fake score conditional alone (scale 1), trained on the rollouts with
their labels.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from models.feature_discriminator import ScoreWithHead
from trainer.core.errors import UserError
from trainer.diffusion.conditioning import model_output
from trainer.diffusion.noise import noised_between, per_sample_noise, per_sample_timesteps
from trainer.parallel import engine
from trainer.parallel.accelerator import prepare_module
from trainer.parallel.collectives import gather_shards, shard_range
from trainer.stage2.critic_step import guarded_update
from trainer.stage2.helpers import Helper
from trainer.training.loop import local_weight, walk_rows
from trainer.training.optim import optimizer_from

TERM = "DistributionMatchingLoss"


def enabled(cfg) -> bool:
    """Whether training.loss has a distribution-matching term (the config refuses one of weight 0)."""
    return any(t.type == TERM for t in cfg.training.loss.losses)


def check_distribution_matching_supported(accelerator, cfg) -> None:
    """One line, before any compute, where the term cannot run: under DeepSpeed beside an online D (the
    fake score and the online D would each need the one second engine)."""
    online = cfg.discriminator.training.mode == "online"
    if enabled(cfg) and online and engine.is_deepspeed(accelerator):
        i = next(i for i, t in enumerate(cfg.training.loss.losses) if t.type == TERM)
        raise UserError(
            f"training.loss.losses[{i}]: {TERM} beside an online discriminator is not supported under "
            "DeepSpeed (each needs the one second engine); set discriminator.training.mode to offline "
            "or train with DDP"
        )


# fields added after the first release, in the fingerprint only where they are not at their default (so
# that states written before them still resume)
LATER_FIELDS = {"reuse_generator_samples": False}


def fingerprint(cfg) -> dict:
    """The fields that define a fine-tune with the term (its resume fingerprint's `distribution_matching`)."""
    fields = dict(vars(cfg.stage2.distribution_matching))
    return {k: v for k, v in fields.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


def batch_size(cfg) -> int:
    """The fake score's global batch per update."""
    s2 = cfg.stage2
    return s2.distribution_matching.batch_size or s2.rollout_batch_size or cfg.training.batch_size


def carried(path) -> tuple[dict, object]:
    """The fake score's (and head's) weights in an iteration's last resume state, and the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state"]["model"]
        return state["distribution_matching"], path
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: no fake score to continue from ({type(e).__name__})") from None


@torch.no_grad()
def score_predictions(schedule, real, fake, x_t, t, autocast=None, labels=None, y=None):
    """(p_real, p_fake): the x0 predictions of the real and fake score models at (x_t, t), in fp32; with a
    class-conditional run's RunLabels and the samples' labels y, the real score's at the run's guidance
    scale and the fake score's conditional alone."""
    preds = []
    for model, scale in ((real, None if labels is None else labels.scale), (fake, 1.0)):
        with autocast() if autocast is not None else contextlib.nullcontext():
            if y is None:
                out = model(x_t, t).sample.float()
            else:
                out = model_output(model, x_t, t, y, scale, labels.null_class).float()
        preds.append(schedule.predictions(out, x_t, t)[1])
    return preds[0], preds[1]


class DistributionMatching(Helper):
    """The teacher, the fake score, its optimizer and the Accelerator that owns its (DDP) wrapper."""

    name = state_key = "distribution_matching"

    def __init__(self, ctx, head=None):
        """ctx: the fine-tune's FinetuneContext (ctx.base: the stage-1 checkpoint the run started from, its
        EMA weights are the teacher); head: a critic that lives on the fake score (its `head` is mounted on
        the fake score's bottleneck and trained in its updates), or None."""
        accelerator, cfg = ctx.accelerator, ctx.cfg
        dm, base = cfg.stage2.distribution_matching, ctx.base
        self.cfg, self.main_acc, self.schedule = cfg, accelerator, ctx.schedule
        self.latent_shape, self.labels = ctx.latent_shape, ctx.labels
        self.engine_path = ctx.layout.fake_score_engine_state(ctx.k)
        self.batch = batch_size(cfg)
        self.teacher = base.new_unet(base.weights).to(accelerator.device).eval().requires_grad_(False)
        module = fake = base.new_unet(base.weights).train()
        groups = [{"params": list(fake.parameters())}]
        self.features = head  # the feature discriminator: a head on the fake score's bottleneck
        if head is not None:
            module = ScoreWithHead(fake, head.head)
            groups.append(head.param_group)
        module = prepare_module(module.to(accelerator.device), cfg.performance, accelerator)
        opt = optimizer_from(groups, dm, cfg.performance, accelerator)
        self.module, self.fake = module, module.unet if head is not None else module
        if head is not None:
            head.module, head.mount = module, self
        second = engine.prepare_second(accelerator, module, opt, self.batch, dm.max_grad_norm)
        self.acc, self.wrapped, self.opt = second
        self.skipped = 0
        if self.name in ctx.init:  # carry_over: the last iteration's fake score (a resume state replaces it)
            self.load_weights(*ctx.init[self.name])

    @classmethod
    def build(cls, ctx):
        hosted = ctx.critic is not None and ctx.critic.host == "fake_score"
        return cls(ctx, ctx.critic if hosted else None)

    @classmethod
    def fingerprint_of(cls, cfg) -> dict:
        return {"distribution_matching": fingerprint(cfg)}

    @classmethod
    def carry(cls, cfg, layout, k: int):
        """What iteration k starts from of iteration k-1 (stage2.distribution_matching.carry_over: the fake
        score's last weights), None otherwise; the iteration's init holds it under the helper's name."""
        if not cfg.stage2.distribution_matching.carry_over:
            return None
        return carried(layout.diffusion_checkpoint(k - 1, "latest")), "the fake score"

    @property
    def columns(self) -> list[str]:
        """Its history columns: the fake score's denoising loss, and those of a critic it hosts."""
        return ["train_fake_loss"] + (self.features.host_columns if self.features is not None else [])

    # -- the generator's signal ----------------------------------------------------------------------
    def predictions(self, x, idx, parts, y=None):
        """(p_real, p_fake) of the generator's samples x (global indices idx; a class-conditional run's labels
        y), each noised to its own level t in [t_min, t_max) x num_steps with its own noise, both drawn from
        (parts, index); no gradient."""
        dm = self.cfg.stage2.distribution_matching
        x_t, t = noised_between(self.schedule, x.detach().float(), idx, dm.t_min, dm.t_max, *parts)
        fake = engine.forward_module(self.acc, self.wrapped, self.fake)
        return score_predictions(
            self.schedule, self.teacher, fake, x_t, t, self.main_acc.autocast, self.labels, y
        )

    # -- the fake score's updates --------------------------------------------------------------------
    def pre_step(self, step, inputs) -> dict:
        """The fake-score updates before generator step `step` (call on every rank), each on fresh rollouts
        of the generator (no gradient): n_fake of them, n_fake - 1 with reuse_generator_samples (the last
        is post_step's). Returns the mean denoising loss (fake_loss), and with a hosted critic its mean loss
        and accuracy (d_loss, d_acc), over the updates so far."""
        model, rollouts, seed, stage = inputs.model, inputs.samples, inputs.seed, inputs.stage
        dm, world = self.cfg.stage2.distribution_matching, self.main_acc.num_processes
        mine = list(shard_range(self.batch, self.main_acc.process_index, world))
        self.sums = {}
        for c in range(dm.n_fake - int(dm.reuse_generator_samples)):
            parts = (seed, stage, "fake-score", step, c)
            with torch.no_grad():
                x0 = rollouts.train_sample(model, mine, (*parts, "rollout")).float()
            y = rollouts.labels_for(mine, (*parts, "rollout"))
            weight = local_weight(len(mine), self.batch, world)
            self.add_logs(self.update(x0, mine, parts, weight, step * dm.n_fake + c, y))
        return dict(self.sums)

    def post_step(self, step, inputs, samples) -> dict:
        """reuse_generator_samples: the last of the n_fake updates, on the generator step's own samples
        (detached; their global indices are the fake-score batch's); returns the mean logs of all n_fake."""
        dm = self.cfg.stage2.distribution_matching
        if not dm.reuse_generator_samples or not samples:
            return {}
        x0 = torch.cat([s.sample for s in samples]).float()
        mine = [i for s in samples for i in s.index]
        y = None if samples[0].labels is None else torch.cat([s.labels for s in samples])
        c, world = dm.n_fake - 1, self.main_acc.num_processes
        weight = local_weight(len(mine), self.batch, world)
        parts = (inputs.seed, inputs.stage, "fake-score", step, c)
        self.add_logs(self.update(x0, mine, parts, weight, step * dm.n_fake + c, y))
        return dict(self.sums)

    def add_logs(self, logs: dict) -> None:
        """One update's logs into the step's means (self.sums, over n_fake updates)."""
        n = self.cfg.stage2.distribution_matching.n_fake
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value / n

    def start(self, run) -> None:
        """The warm start of a fine-tune that starts afresh, on the iteration's saved fakes (run.warm_fakes:
        this rank's block, N and a class-conditional run's N labels, set by the iteration; None: none)."""
        if run.warm_fakes is None:
            return
        fakes, n, labels = run.warm_fakes
        logs = self.warm_start(fakes, n, run.seed, run.stage, labels)
        if logs:
            steps = self.cfg.stage2.distribution_matching.warm_start_steps
            first, last = (" ".join(f"{k}={v:.4g}" for k, v in logs[x].items()) for x in logs)
            run.log(f"fake score warm start: {steps} updates on the saved fakes: {first} -> {last}")

    def warm_start(self, fake_local, n: int, seed, stage, fake_labels=None) -> dict:
        """stage2.distribution_matching.warm_start_steps updates of the fake score (and its head) on the
        iteration's N saved fakes (this rank's shard_range block `fake_local`), before the first generator
        step of a fine-tune that starts afresh (call on every rank). Update s takes the slots of the s-th
        batch of a walk over per-epoch permutations of the N fakes: the same at any world size. Returns the
        losses of the first and the last update, {"first": logs, "last": logs}, on this rank. fake_labels: a
        class-conditional run's labels of the N fakes."""
        steps, device = self.cfg.stage2.distribution_matching.warm_start_steps, self.main_acc.device
        if not steps:
            return {}
        fakes = gather_shards(fake_local.to(device).float(), n).cpu()
        world = self.main_acc.num_processes
        mine = list(shard_range(self.batch, self.main_acc.process_index, world))
        weight = local_weight(len(mine), self.batch, world)
        warm = f"{stage}:warm-start"
        out = {}
        for s in range(steps):
            rows = walk_rows(n, mine, s, self.batch, seed, warm, "fake")
            y = None if fake_labels is None else fake_labels[rows].to(device)
            logs = self.update(fakes[rows].to(device), mine, (seed, warm, s), weight, s, y)
            out.setdefault("first", logs)
            out["last"] = logs
        return out

    def update(self, x0, idx, parts, weight: float, draw: int = 0, y=None) -> dict:
        """One denoising step of the fake score on this rank's samples x0 (global indices idx), with the
        feature head's classification step (the phase's draw-th head batch) where there is one; weight
        turns the local mean into this rank's share of the global mean. A non-finite loss on any rank
        skips the update on every rank. y: a class-conditional run's labels of x0."""
        dm, device = self.cfg.stage2.distribution_matching, self.main_acc.device
        noise = per_sample_noise(idx, tuple(self.latent_shape), *parts, "noise").to(device)
        t = per_sample_timesteps(idx, self.schedule.num_steps, *parts, "t").to(device)
        x_t = self.schedule.add_noise(x0, noise, t)
        if self.features is None:
            with self.main_acc.autocast():
                out = self.wrapped(x_t, t, class_labels=y).sample.float()
        else:
            x_cls, t_cls, real_in, y_cls = self.features.inputs(x0, idx, parts, draw, y)
            with self.main_acc.autocast(), self.features.forward_context():
                out, logits = self.wrapped(x_t, t, x_cls, t_cls, y, y_cls)
            out = out.float()
        target = self.schedule.target(x0, noise, t).float()
        loss = F.mse_loss(out, target) if len(idx) else out.sum() * 0.0
        logs = {"fake_loss": float(loss.detach())}
        if self.features is not None:
            head_loss, head_logs = self.features.loss(logits, real_in)
            loss, logs = loss + head_loss, {**logs, **head_logs}
        params = self.wrapped.parameters()
        if not guarded_update(self.main_acc, self.acc, self.opt, params, loss, weight, dm.max_grad_norm):
            self.skipped += 1
            return {key: float("nan") for key in logs}
        return logs

    # -- state -----------------------------------------------------------------------------------------
    def state(self, run) -> dict:
        """Weights and optimizer for the fine-tune's resume state (call on every rank)."""
        opt = engine.second_optimizer_state(self.acc, self.opt, self.engine_path)
        state = {"fake": engine.state_dict(self.acc, self.fake), "optimizer": opt, "skipped": self.skipped}
        if self.features is not None:
            state["head"] = engine.state_dict(self.acc, self.module.head)
        return state

    def load_weights(self, state: dict, source) -> None:
        """The fake score's (and head's) weights of an earlier iteration's resume state, `source` its file:
        where stage2.distribution_matching.carry_over starts iteration k+1 (its optimizer starts afresh)."""
        engine.load_state_dict(self.acc, self.fake, state["fake"])
        if self.features is not None:
            if "head" not in state:
                raise UserError(f"{source}: no feature discriminator head to continue from")
            engine.load_state_dict(self.acc, self.module.head, state["head"])

    def load_state(self, state, run) -> None:
        if state is None:  # (the fingerprint names the term's fields first)
            raise run.missing_state("a fake score")
        engine_folder = self.engine_path
        engine.load_state_dict(self.acc, self.fake, state["fake"])
        if self.features is not None:
            if "head" not in state:  # (the fingerprint names the head's fields first)
                raise UserError(f"{engine_folder}: a resume state without the feature discriminator's head")
            engine.load_state_dict(self.acc, self.module.head, state["head"])
        engine.load_second_optimizer_state(
            self.acc, self.opt, state["optimizer"], engine_folder, "fake score"
        )
        self.skipped = int(state.get("skipped", 0))
