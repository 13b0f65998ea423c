"""Trainer overhead of the lean generator step: stage 2's distribution-matching step with the feature head,
as the embedded default's recipe for K runs it (K = 1 and 4), against a hand-written PyTorch loop of the
same maths.

    python bench/lean_overhead.py [--quick] [--ks 1 4] [--threads N] [--repeats R] [--strict]

Both sides run on the same models and sizes: the `tiny` UNet on 4x8x8 latents (random-init stage-1
checkpoint), batch 64, K DDIM steps from noise with gradients through all K, the digits recipe for K:
distribution matching (weight 1) and the feature head's non-saturating term (weight 0.05 at K = 1, 0.5 at
K = 4), n_fake 2 with the last fake-score update on the generator step's own samples, no real batch, a
constant lr (2e-4 at K = 1, 1e-4 at K = 4: the recipe's cosine at K = 4 costs the same per step), clipping
1, EMA. "ours" is FinetuneTrainer's step loop (StepTrainer._run_steps: helpers' pre- and post-steps,
per-sample seeding, non-finite guards, logging; validation and checkpoints off). "raw" is a plain loop,
one torch.Generator for every draw:

  1. one fake-score update on a fresh K-step sample (no gradient): the fake score's v-prediction loss at
     uniform t, plus feature_loss_weight (0.01) x the head's BCE on noised reals against the noised sample,
     one forward of ScoreWithHead, backward, clipping, AdamW (two parameter groups);
  2. the generator step: K UNet calls from noise and their DDIM steps; the sample noised to t in
     [0.02, 0.98) (teacher and fake score x0 predictions without gradient, the DM loss), the sample noised
     again for the head (its logits through the frozen encoder and head, softplus(-logits)); backward,
     clipping, AdamW, the lr schedule, EMA;
  3. the second fake-score update, on the generator step's sample, detached.

Before timing, one step of each side is counted (bench/step_cost.py's Counter): the UNet forwards and
the head-encoder forwards per step, and those back-propagated, in batch-64 units; the two sides must make
the same calls ("same calls: PASS"), or the comparison is not of the same maths.

Blocks of steps alternate after a warm-up (bench/overhead.py's `measure`); the verdict is on process CPU
time per step with one torch thread, wall time otherwise. Target: ours / raw at most 1.05x (issue 34).
--quick: K = 1 only. Exit code 0 whatever the result unless --strict.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _multiproc import machine_header  # noqa: E402
from overhead import Ours, measure, stage1_files  # noqa: E402
from step_cost import Counter  # noqa: E402

TARGET = 1.05  # ours / raw time per step, at most
# the recipes' DiscriminatorLoss weight and lr by K (trainer/config/defaults/digits.yaml); the lr is constant
# at both (the schedule's shape costs nothing per step)
RECIPES = {1: {"head": 0.05, "lr": 2e-4}, 4: {"head": 0.5, "lr": 1e-4}}


def lean_config(root: Path, batch: int, num_samples: int, k: int):
    """The embedded default's lean recipe for K on the bench's random-init stage 1: gradients through all K
    steps (rollout_grad_steps K), n_fake 2 with the last update on the step's own samples."""
    from trainer.config.load import load_config

    manifest, ae, ckpt = stage1_files(root)
    terms = [
        {"type": "DistributionMatchingLoss", "key": "latent", "target": None, "weight": 1.0},
        {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": RECIPES[k]["head"]},
    ]
    return load_config(
        data={
            "experiment": {"name": "bench", "save_path": str(root / f"out_lean_k{k}")},
            "diffusion": {"stage1_checkpoint": str(ckpt)},
            "autoencoder": {"checkpoint": str(ae)},
            "dataset": {"manifest": str(manifest)},
            "discriminator": {"config": {"type": "unet_features"}, "training": {"loss": "bce"}},
            "training": {
                "batch_size": batch,
                "max_grad_norm": 1.0,
                "ema_decay": 0.995,
                "loss": {"type": "CompositeLoss", "losses": terms},
            },
            "stage2": {
                "generation_steps": k,
                "rollout_grad_steps": k,
                "rollout_batch_size": batch,
                "num_samples": num_samples,
                "sample_with_replacement": True,
                "learning_rate": RECIPES[k]["lr"],
                "lr_schedule": "constant",
                "distribution_matching": {"n_fake": 2, "reuse_generator_samples": True},
            },
        }
    )


def build(root: Path, k: int, batch: int = 64, num_samples: int = 5000):
    """(ours: the fine-tune phase of iteration 0, raw: the hand-written loop), from the same weights."""
    import torch

    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import setup, stratified_split

    cfg = lean_config(root, batch, num_samples, k)
    ctx = setup(cfg, build_accelerator("cpu"))
    torch.manual_seed(1)
    real = torch.randn(num_samples, *ctx.latent_shape)
    td = cfg.discriminator.training
    split = stratified_split(num_samples, td.train_split, cfg.training.seed, 0, "real")
    init = {"raw": ctx.stage1.weights, "ema": ctx.stage1.weights}
    trainer = ctx.finetune_trainer(0, real, split, None, init)
    return trainer, RawLean(ctx, real[torch.from_numpy(split)], trainer)


class RawLean:
    """The lean K = 1 step written out by hand with plain PyTorch and diffusers."""

    def __init__(self, ctx, reals, ours):
        import torch

        from models.feature_discriminator import ScoreWithHead
        from trainer.stage2 import new_head

        cfg = ctx.cfg
        s2, t, td, dm = cfg.stage2, cfg.training, cfg.discriminator.training, cfg.stage2.distribution_matching
        self.torch, self.reals, self.batch, self.shape = torch, reals, t.batch_size, tuple(ctx.latent_shape)
        weights = ctx.stage1.weights
        self.unet = ctx.stage1.new_unet(weights).train()
        self.teacher = ctx.stage1.new_unet(weights).eval().requires_grad_(False)
        head = new_head(cfg, ctx.stage1.unet_config)
        self.score = ScoreWithHead(ctx.stage1.new_unet(weights).train(), head)
        self.ema = [p.detach().clone() for p in self.unet.parameters()]
        self.ema_decay, self.ema_updates = t.ema_decay, 0
        self.opt = torch.optim.AdamW(
            self.unet.parameters(), lr=s2.learning_rate, weight_decay=t.weight_decay, betas=tuple(t.betas)
        )
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)  # constant
        head_group = {"lr": td.learning_rate, "betas": tuple(td.betas), "weight_decay": td.weight_decay}
        self.score_opt = torch.optim.AdamW(
            [
                {"params": list(self.score.unet.parameters())},
                {"params": list(head.parameters()), **head_group},
            ],
            lr=dm.learning_rate,
            weight_decay=dm.weight_decay,
            betas=tuple(dm.betas),
        )
        sch = ctx.schedule
        self.noise_sched, self.ddim, self.n_t = sch.train, sch.ddim(), sch.num_steps
        self.ab = self.noise_sched.alphas_cumprod
        self.dm_range = self._range(dm.t_min, dm.t_max)
        self.head_range = self._range(*_feature_range(cfg))
        self.head_weight, self.feature_weight = RECIPES[s2.generation_steps]["head"], td.feature_loss_weight
        self.k = s2.generation_steps
        self.clip, self.score_clip = t.max_grad_norm, dm.max_grad_norm
        self.gen = torch.Generator().manual_seed(0)

    def _range(self, lo: float, hi: float) -> tuple[int, int]:
        low = min(int(lo * self.n_t), self.n_t - 1)
        return low, max(low + 1, int(hi * self.n_t))

    # -- the maths --------------------------------------------------------------------------------------
    def _noised(self, x, t_range):
        noise = self.torch.randn(x.shape, generator=self.gen)
        t = self.torch.randint(*t_range, (x.shape[0],), generator=self.gen)
        return self.noise_sched.add_noise(x, noise, t), t, noise

    def _x0(self, out, x_t, t):  # v-prediction -> x0
        ab = self.ab[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out

    def _sample(self, model):
        """K DDIM steps from noise (gradients through all of them where the caller keeps them)."""
        x = self.torch.randn((self.batch, *self.shape), generator=self.gen)
        self.ddim.set_timesteps(self.k)
        for t in self.ddim.timesteps:
            x = self.ddim.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        return x

    def _score_update(self, fake):
        torch, F = self.torch, self.torch.nn.functional
        x_t, t, noise = self._noised(fake, (0, self.n_t))
        ab = self.ab[t].view(-1, 1, 1, 1)
        target = ab.sqrt() * noise - (1 - ab).sqrt() * fake
        real = self.reals[torch.randint(0, self.reals.shape[0], (self.batch,), generator=self.gen)]
        zr, tr, _ = self._noised(real, self.head_range)
        zf, tf, _ = self._noised(fake, self.head_range)
        out, logits = self.score(x_t, t, torch.cat([zr, zf]), torch.cat([tr, tf]))
        n = self.batch
        head = F.softplus(-logits[:n]).mean() + F.softplus(logits[n:]).mean()
        loss = F.mse_loss(out, target) + self.feature_weight * head
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.score.parameters(), self.score_clip)
        self.score_opt.step()
        self.score_opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        torch, F = self.torch, self.torch.nn.functional
        with torch.no_grad():
            fresh = self._sample(self.unet)
        self._score_update(fresh)
        self.score.requires_grad_(False)
        x = self._sample(self.unet)
        x_t, t, _ = self._noised(x.detach(), self.dm_range)
        with torch.no_grad():
            p_real = self._x0(self.teacher(x_t, t).sample, x_t, t)
            p_fake = self._x0(self.score.unet(x_t, t).sample, x_t, t)
        w = (x.detach() - p_real).abs().flatten(1).mean(1).clamp_min(1e-6).view(-1, 1, 1, 1)
        dm = 0.5 * (x - (x - (p_fake - p_real) / w).detach()).pow(2).flatten(1).mean(1).mean()
        z, tz, _ = self._noised(x, self.head_range)
        adv = F.softplus(-self.score.logits(z, tz)).mean()
        loss = dm + self.head_weight * adv
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.clip)
        self.opt.step()
        self.lr_sched.step()
        decay = min(self.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        self.ema_updates += 1
        with torch.no_grad():
            for s, p in zip(self.ema, self.unet.parameters(), strict=True):
                s.mul_(decay).add_(p.detach(), alpha=1 - decay)
        self.score.requires_grad_(True)
        self._score_update(x.detach())

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()


def _feature_range(cfg):
    from trainer.config.sections_discriminator import feature_t_range

    return feature_t_range(cfg)


def same_calls(ours, raw) -> bool:
    """One step of each, its UNet and head-encoder calls counted; prints both and whether they agree."""
    counter = Counter()
    counter.install()
    counts = {}
    for name, side in (("ours", ours), ("raw", raw)):
        counter.take()
        side.run(1)
        counts[name] = counter.take()
    for name, c in counts.items():
        print(
            f"  {name} calls per step (batch-64 units): UNet forwards {c['forward']:.2f} "
            f"(back-propagated {c['forward backward']:.2f}), head encoder {c['encoder']:.2f} "
            f"(back-propagated {c['encoder backward']:.2f})"
        )
    same = counts["ours"] == counts["raw"]
    print(f"same calls: {'PASS' if same else 'FAIL'}", flush=True)
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: K = 1 only, 3 repeats of 1 step")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4], choices=sorted(RECIPES), help="step counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as bench/overhead.py)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved blocks per side (default 10)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    print(machine_header(args.threads), flush=True)
    clock = "cpu" if args.threads == 1 else "wall"
    repeats, block, warmup = (args.repeats or 3, 1, 1) if args.quick else (args.repeats or 10, 2, 2)
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="advdiff-bench-") as tmp:
        for k in [1] if args.quick else args.ks:
            ours, raw = build(Path(tmp), k)
            label = f"lean K = {k} step (distribution matching + feature head, n_fake 2, reuse)"
            print(f"[{label}] tiny UNet, latents {raw.shape}, batch {raw.batch}", flush=True)
            ours_side = Ours(ours)
            same = same_calls(ours_side, raw)
            result = measure(label, ours_side, raw, block, repeats, warmup, clock)
            verdicts.append((label, result["ratio"], result["ratio"] <= TARGET and same))
    for label, ratio, ok in verdicts:
        verdict = "PASS" if ok else "MISS"
        print(f"target ours/raw {clock} time per step <= {TARGET:.2f}x [{label}]: {ratio:.3f}x: {verdict}")
    return 1 if (args.strict and not all(ok for *_, ok in verdicts)) else 0


if __name__ == "__main__":
    sys.exit(main())
