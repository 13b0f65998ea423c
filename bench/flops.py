"""The real size on paper (issue 34, part 6): the FLOPs of one spec-sized stage-2 iteration, counted on CPU.

    python bench/flops.py [--quick] [--out PATH]

An estimate, not a measurement: torch's FLOP counter (`torch.utils.flop_counter.FlopCounterMode`) around
the project's own code, `DiscriminatorTrainer.train_step`, `FinetuneTrainer.train_step` (its helpers'
`pre_step`, the fake-score updates, tallied apart within the step) and `generate_own`, built as stage 2
builds them (bench/gpu_bench.py's synthetic experiment: a random `unet64_d4` at 16x32x32 latents, the rest
from `experiments/stage2_discriminator_unet64_d4.yaml`) at batch b = 1 and 2 (D batch 2b, half real), and
scaled linearly to the real batch. The count follows the code: a leaner step gives a smaller count here.

Recipes:
  spec    the spec's: the example config's latent D (16-64-4, batch 64) trained offline, then the fine-tune
          in rollout mode (100 DDIM steps, gradient through the last 1), MSE 1.0 + D 0.1, batch 32
  dm_k1   distribution matching with the feature head (the loss, discriminator and distribution_matching
  dm_k4   sections of trainer/config/defaults/digits.yaml: n_fake 5 fake-score updates per generator step,
          each on fresh rollouts) at K = 1 / 4 DDIM steps, gradient through all K, on the spec's batch 32
          (the rollout and fake-score batches default to it)

Every count is checked to double from b = 1 to 2. The spec's 100-step rollouts and generation are counted
at 2 and 4 steps and extended along the step count, F(b, S) = b (F(1, 2) + (S - 2) slope), the slope checked
against one counted UNet forward; DM is counted at its own K. A counted step whose update was skipped (a
non-finite loss) stops the bench. One iteration (N = 5000 samples; split 0.8: 4000 training reals):

  generation    N fakes x S DDIM steps (generate_own)
  D training    epochs x (4000 // 32) D steps of batch 64 (spec only: DM has no offline D phase)
  fine-tune     epochs x (4000 // 32) generator steps of batch 32, fake-score updates included
  validation    composed from unit counts, not run: once per epoch (the default interval) the EMA UNet on
                the 1000 held-out reals, val_samples (64) rollouts at S steps, the critic (latent D, or the
                head's encoder half + head) on both, with DM the teacher and the fake score on the 64
                (val_dm); the spec's D phase scores its 2000 held-out latents per epoch; the summary row
                generates metric_samples (1000) at S steps and the critic scores 2000

Not counted: encoding the N reals (the user's AE, not the project's; none with pre-embedded latents), the
summary's decoding and feature extraction, and what the counter leaves out: it counts matrix products,
convolutions and attention (the dense work MFU is quoted on; the CPU attention kernel, which its table
lacks, with the table's formulas), not norms, activations, the DDIM update or the optimizer. Hours are
FLOPs / (utilisation x 989 TFLOP/s, the H100 SXM's dense bf16 peak on NVIDIA's spec sheet) at 20, 35, 50 %.

`--quick`: the same code on the `micro` UNet at 4x8x8. One thread: a count needs no speed, and on busy cores
a second thread's spin-waits cost ten times over. Prints a table per recipe and writes the counts as JSON
(default bench/results/flops_<date>.json; with --quick only to --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _multiproc import machine_header  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

PEAK = 989e12  # H100 SXM, dense bf16 (no sparsity), NVIDIA's spec sheet
UTILISATIONS = (0.20, 0.35, 0.50)
QUICK_D = {"latent_channels": 4, "base_channels": 16, "num_layers": 2}
SIZES = {"real": ("unet64_d4", (16, 32, 32), {}), "quick": ("micro", (4, 8, 8), QUICK_D)}
COUNT_REALS = 10  # reals behind each counted trainer (8 train, 2 held out): a step reads b of them
aten = torch.ops.aten


# the counter knows the CUDA attention kernels, not the CPU one (the UNet's mid block): the same formulas
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: (
        sdpa_flop_count(q, k, v)
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, out_shape=None, **kw: (
        sdpa_backward_flop_count(g, q, k, v)
    ),
}


class Counts:
    """Stage 2 as it runs (one synthetic experiment, a config per counted point), and the counts made."""

    def __init__(self, size: str, root: Path):
        from gpu_bench import experiment

        from trainer.parallel.accelerator import build_accelerator
        from trainer.stage2 import stratified_split

        preset, self.latent, d_arch = SIZES[size]
        self.raw, self.recipe = [], None  # recipe: the name the counts are made for
        overrides = {f"discriminator.config.{k}": v for k, v in d_arch.items()}
        overrides["stage2.num_samples"] = COUNT_REALS
        self.base = experiment(root, COUNT_REALS, preset, self.latent, overrides).to_dict()
        self.acc = build_accelerator("cpu", "no")
        gen = torch.Generator().manual_seed(0)
        self.real, self.fake = (torch.randn(COUNT_REALS, *self.latent, generator=gen) for _ in range(2))
        self.train = stratified_split(COUNT_REALS, 0.8, 0, 0, "real")
        self.fake_train = stratified_split(COUNT_REALS, 0.8, 0, 0, "fake")

    def context(self, overrides: dict, b: int = 1):
        """Stage 2's shared setup for the recipe at batch b (D batch 2b)."""
        from trainer.config.load import load_config
        from trainer.stage2 import setup

        batches = {"training.batch_size": b, "discriminator.training.batch_size": 2 * b}
        return setup(load_config(data=self.base, overrides={**overrides, **batches}), self.acc)

    def count(self, fn, what: str, **point) -> int:
        """FLOPs of fn(counter), recorded under `what` with the point's sizes."""
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            fn(counter)
        self.raw.append({"what": what, "recipe": self.recipe, **point, "flops": counter.get_total_flops()})
        return self.raw[-1]["flops"]

    def d_step(self, recipe: dict, b: int) -> int:
        trainer = self.context(recipe, b).discriminator_trainer(
            0, self.real, self.fake, self.train, self.fake_train
        )
        return self.count(lambda _: trainer.train_step(0), "d_step", d_batch=2 * b)

    def g_step(self, recipe: dict, b: int, steps: int) -> tuple[int, int]:
        """(the whole generator step, its helpers' pre-steps' part: the fake-score updates) at batch b."""
        from models.discriminator import build_discriminator

        ctx = self.context({**recipe, "stage2.generation_steps": steps}, b)
        latent_d = ctx.cfg.discriminator.config.type == "latent"
        d = build_discriminator(ctx.cfg.discriminator.config) if latent_d else None
        init = {"raw": ctx.stage1.weights, "ema": ctx.stage1.weights}
        trainer = ctx.finetune_trainer(0, self.real, self.train, d, init)
        pre = []

        def step(counter):
            for helper in trainer.helpers:  # the counter's running total around each pre-step
                helper.pre_step = _tallied(helper.pre_step, pre, counter.get_total_flops)
            logs = trainer.train_step(0)
            skipped = trainer.nonfinite_skipped + sum(getattr(h, "skipped", 0) for h in trainer.helpers)
            assert not skipped and all(v == v for v in logs.values()), f"a counted update was skipped: {logs}"

        total = self.count(step, "g_step", batch=b, steps=steps)
        self.raw[-1]["pre_step"] = sum(pre)
        return total, sum(pre)

    def generation(self, recipe: dict, n: int, steps: int) -> int:
        from trainer.stage2 import generate_own

        ctx = self.context(recipe)
        unet = ctx.stage1.new_unet().to(self.acc.device).eval()
        kw = dict(seed=0, k=0, steps=steps, eta=0.0, batch_size=n)

        def run(_):
            generate_own(self.acc, unet, ctx.schedule.ddim(), range(n), ctx.latent_shape, **kw)

        return self.count(run, "generation", n=n, steps=steps)

    def units(self, b: int) -> dict:
        """Unit costs at batch b: a UNet forward (and with its backward), a latent D forward, and the feature
        head's encoder half + head forward; and the UNet's parameter count."""
        from models.discriminator import build_discriminator
        from models.feature_discriminator import ScoreWithHead
        from trainer.stage2 import new_head

        ctx = self.context({})
        unet, d = ctx.stage1.new_unet(), build_discriminator(ctx.cfg.discriminator.config)
        scorer = ScoreWithHead(unet, new_head(ctx.cfg, ctx.stage1.unet_config))
        x, t = torch.randn(b, *self.latent), torch.full((b,), 10)
        fb = self.count(lambda _: unet(x, t).sample.sum().backward(), "unet_forward_backward", batch=b)
        with torch.no_grad():
            return {
                "parameters": sum(p.numel() for p in unet.parameters()),
                "unet_forward": self.count(lambda _: unet(x, t), "unet_forward", batch=b),
                "unet_forward_backward": fb,
                "d_forward": self.count(lambda _: d(x), "d_forward", batch=b),
                "head_forward": self.count(lambda _: scorer.logits(x, t), "head_forward", batch=b),
            }


def _tallied(fn, into: list, total):
    """fn, appending to `into` how far total() moved during each call."""

    def tallied(*args, **kwargs):
        before = total()
        result = fn(*args, **kwargs)
        into.append(total() - before)
        return result

    return tallied


def dm_recipe(k: int) -> dict:
    """Distribution matching with the feature head, at K steps: the embedded default's loss, discriminator and
    distribution_matching sections, without its per-K stage2.recipes (so fresh rollouts for every
    fake-score update and the gradient through all K steps, as issue 34 states the recipe)."""
    from trainer.config.load import read_yaml

    digits = read_yaml(REPO / "trainer" / "config" / "defaults" / "digits.yaml")
    return {
        "training.loss": digits["training"]["loss"],
        "discriminator": digits["discriminator"],
        "stage2.distribution_matching": digits["stage2"]["distribution_matching"],
        "stage2.generation_steps": k,
        "stage2.rollout_grad_steps": k,
    }


RECIPES = {
    "spec": ("(a) the spec's offline latent D, then MSE + D in rollout mode", lambda: {}),
    "dm_k1": ("(b) distribution matching + feature head, K = 1", lambda: dm_recipe(1)),
    "dm_k4": ("(c) distribution matching + feature head, K = 4", lambda: dm_recipe(4)),
}


def real_run(recipe: dict) -> dict:
    """The sizes of one spec-sized iteration under the recipe, from the example config, as the trainers
    derive them (steps per epoch: training reals // batch, D's // half its batch; one validation per
    epoch)."""
    from trainer.config.load import load_config
    from trainer.stage2 import stratified_split

    yaml = REPO / "experiments" / "stage2_discriminator_unet64_d4.yaml"
    cfg = load_config(yaml, {"autoencoder.checkpoint": None, **recipe})
    s2, t, td = cfg.stage2, cfg.training, cfg.discriminator.training
    n = s2.num_samples
    n_train = int(stratified_split(n, td.train_split, t.seed, 0, "real").sum())  # as run.py splits
    latent_d = cfg.discriminator.config.type == "latent"
    return {
        "num_samples": n,
        "train_reals": n_train,
        "held_out": n - n_train,
        "steps": s2.generation_steps,
        "grad_steps": s2.rollout_grad_steps,
        "batch": t.batch_size,
        "d_batch": td.batch_size if latent_d else 0,
        "d_steps": td.epochs * max(1, n_train // (td.batch_size // 2)) if latent_d else 0,
        "d_validations": td.epochs if latent_d else 0,
        "g_steps": s2.diffusion_epochs * max(1, n_train // t.batch_size),
        "g_validations": s2.diffusion_epochs,
        "n_fake": s2.distribution_matching.n_fake
        if any(t.type == "DistributionMatchingLoss" for t in cfg.training.loss.losses)
        else 0,
        "val_samples": s2.val_samples,
        "metric_samples": s2.metric_samples,
        "critic": "latent D" if latent_d else "feature head",
    }


def along_steps(count, steps: int, forward: int) -> tuple[float, dict]:
    """A per-sample count at `steps` DDIM steps from count(b, s) at b = 1, 2: counted at `steps` up to 4,
    else at 2 and 4 steps and extended along the step count (its slope against `forward`, one UNet
    forward of one sample). Returns (per sample, checks)."""
    s0 = 2 if steps > 4 else steps
    one = count(1, s0)
    checks = {"batch 2 / batch 1": count(2, s0) / one}
    if s0 == steps:
        return float(one), checks
    slope = (count(1, 4) - one) / (4 - s0)
    checks["slope per DDIM step / one UNet forward"] = slope / forward
    return one + (steps - s0) * slope, checks


def measure(c: Counts, recipe: dict, units: dict) -> dict:
    """Per-step counts, the phases of one iteration and hours, for one recipe."""
    run, pre = real_run(recipe), {}
    b, steps, forward = run["batch"], run["steps"], units["unet_forward"]

    def g(bb, s):
        total, pre[bb, s] = c.g_step(recipe, bb, s)
        return total

    g_one, g_checks = along_steps(g, steps, forward)
    gen_one, gen_checks = along_steps(lambda bb, s: c.generation(recipe, bb, s), steps, forward)
    checks = {f"generator step: {k}": v for k, v in g_checks.items()}
    checks |= {f"generation: {k}": v for k, v in gen_checks.items()}
    per_step = {f"generator step (batch {b})": g_one * b}
    d_step = 0.0
    if run["d_batch"]:
        d1 = c.d_step(recipe, 1)
        checks["D step: batch 2 / batch 1"] = c.d_step(recipe, 2) / d1
        d_step = per_step[f"D step (batch {run['d_batch']})"] = d1 * run["d_batch"] / 2
    if run["n_fake"]:  # counted at its own K (along_steps: K <= 4)
        one = pre[1, steps]
        checks["fake-score updates: batch 2 / batch 1"] = pre[2, steps] / one
        per_step[f"fake-score update (batch {b})"] = one * b / run["n_fake"]
        per_step[f"generator step without its {run['n_fake']} updates"] = (g_one - one) * b
    phases = {
        "generation": run["num_samples"] * gen_one,
        "D training": run["d_steps"] * d_step,
        "fine-tune": run["g_steps"] * g_one * b,
        "validation + summary row (composed)": validation(run, units),
    }
    total = sum(phases.values())
    hours = {f"{round(u * 100)}%": total / (u * PEAK) / 3600 for u in UTILISATIONS}
    return dict(run=run, per_step=per_step, phases=phases, iteration=total, hours=hours, checks=checks)


def validation(run: dict, u: dict) -> float:
    """Validation and the summary row of one iteration, composed from the unit counts (module docstring)."""
    critic = u["d_forward"] if run["critic"] == "latent D" else u["head_forward"]
    unet, val, held_out = u["unet_forward"], run["val_samples"], run["held_out"]
    per_val = held_out * unet + val * run["steps"] * unet + (held_out + val) * critic
    if run["n_fake"]:  # val_dm: the teacher and the fake score on the validation samples
        per_val += 2 * val * unet
    d_phase = run["d_validations"] * 2 * held_out * u["d_forward"]
    summary = run["metric_samples"] * (run["steps"] * unet + 2 * critic)
    return run["g_validations"] * per_val + d_phase + summary


def table(name: str, title: str, r: dict, unit: float, label: str) -> str:
    """One recipe's table: per step, per phase in `label` (their sum is the iteration) and hours."""
    run = r["run"]
    lines = [
        f"recipe {name}: {title}",
        f"  N {run['num_samples']} ({run['train_reals']} train, {run['held_out']} held out), {run['steps']} "
        f"DDIM steps, gradient through {run['grad_steps']}, batch {run['batch']}; {run['d_steps']} D steps, "
        f"{run['g_steps']} generator steps, {run['n_fake']} fake-score updates each; critic: {run['critic']}",
        f"  {'per step':<48} {'GFLOP':>12}",
        *(f"  {k:<48} {v / 1e9:>12.1f}" for k, v in r["per_step"].items()),
        f"  {'phase of one iteration':<48} {label:>12} {'share':>7}",
        *(f"  {k:<48} {v / unit:>12.3f} {100 * v / r['iteration']:>6.1f}%" for k, v in r["phases"].items()),
        f"  {'iteration (sum of the phases)':<48} {r['iteration'] / unit:>12.3f} {100.0:>6.1f}%",
        f"  hours on one H100 at {PEAK / 1e12:.0f} TFLOP/s x utilisation (estimate): "
        + ", ".join(f"{v:.4g} h at {k}" for k, v in r["hours"].items()),
    ]
    return "\n".join(lines + [f"  check {k}: {v:.4f}" for k, v in r["checks"].items()])


def header(c: Counts, size: str) -> tuple[dict, str]:
    """The unit counts (batch 1) and the lines that introduce the tables: the model, one forward's count
    and its linearity in the batch."""
    units, units2 = c.units(1), c.units(2)
    preset, latent, _ = SIZES[size]
    ratio = units2["unet_forward"] / units["unet_forward"]
    return units, "\n".join(
        [
            f"FLOP count, an estimate (counted on CPU; no GPU time was measured): {preset} "
            f"({units['parameters'] / 1e6:.1f}M parameters) at " + "x".join(map(str, latent)),
            f"  one UNet forward: {units['unet_forward'] / 1e9:.4f} GFLOP per sample, with its backward "
            f"{units['unet_forward_backward'] / 1e9:.4f}; batch 2 / batch 1: {ratio:.4f}",
        ]
    )


def code_state() -> str:
    """The commit counted, and the files of the counted code (trainer/, models/) changed since it."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout  # noqa: E731
    changed = [line[3:] for line in git("status", "--porcelain", "--", "trainer", "models").splitlines()]
    return git("rev-parse", "--short", "HEAD").strip() + (
        f" with changes in {', '.join(changed)}" if changed else ""
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the micro UNet at 4x8x8: the same code in seconds")
    p.add_argument("--out", type=Path, help="JSON of the counts (default bench/results/flops_<date>.json)")
    args = p.parse_args(argv)
    t0, date, size = time.time(), time.strftime("%Y-%m-%d"), "quick" if args.quick else "real"
    torch.set_num_threads(1)  # counts need no speed; on busy cores a second thread's spin-waits cost 10x
    unit = (1e12, "TFLOP") if args.quick else (1e15, "PFLOP")
    machine = machine_header(torch.get_num_threads())
    print(machine)
    with tempfile.TemporaryDirectory(prefix="advdiff_flops_") as root:
        c = Counts(size, Path(root))
        units, text = header(c, size)
        print(text)
        results = {}
        for name, (title, recipe) in RECIPES.items():
            c.recipe = name
            results[name] = measure(c, recipe(), units)
            print(table(name, title, results[name], *unit), flush=True)
    seconds = time.time() - t0
    print(f"counted in {seconds:.0f} s")
    record = {
        "date": date,
        "command": "python bench/flops.py" + " --quick" * args.quick,
        "code": code_state(),
        "machine": machine,
        "note": "an estimate: FLOPs counted on CPU with torch.utils.flop_counter; no GPU time was measured",
        "size": {"preset": SIZES[size][0], "latent": list(SIZES[size][1])},
        "peak_flops": PEAK,
        **{"units": units, "recipes": results, "raw": c.raw, "seconds": round(seconds, 1)},
    }
    out = args.out or (None if args.quick else REPO / "bench" / "results" / f"flops_{date}.json")
    if out is not None:
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
