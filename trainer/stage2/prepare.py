"""What a stage-2 run shares, built once after every check passed (`setup`), and what it reads back from
its folder: whether an iteration finished, each iteration's result and discriminator, checkpoint weights.

`setup(cfg, acc, read_only=True)` is the commands that only read a run (`advdiff evaluate`): the checks
that guard a run's own folder (its recorded config fields, its saved latents, that it is writable) are
skipped, and nothing built from it writes into the folder."""

from __future__ import annotations

from dataclasses import dataclass

from models.autoencoder import LatentScaling, scaling_from_config
from trainer.config.sections import Config
from trainer.core.errors import UserError
from trainer.core.log import Logger
from trainer.data.latents import LatentCodec
from trainer.diffusion.checkpoints import DiffusionCheckpoint, load_diffusion_checkpoint
from trainer.diffusion.schedule import Schedule
from trainer.files.layout import RunLayout
from trainer.quality.evaluation import Evaluator
from trainer.stage2.checks import ae_path, start_checks
from trainer.stage2.discriminator_trainer import DiscriminatorTrainer
from trainer.stage2.finetune_trainer import FinetuneTrainer
from trainer.stage2.labels import RunLabels


@dataclass
class Stage2Setup:
    """What every iteration shares, built once after the checks passed: plain values, no callbacks."""

    cfg: Config
    acc: object
    layout: RunLayout
    log: Logger
    stage1: DiffusionCheckpoint  # the model stage 2 starts from (EMA weights)
    schedule: Schedule  # the stage-1 model's noise schedule, sampled with the run's timestep spacing
    latent_shape: tuple
    rows: object  # the filtered manifest (DataFrame)
    codec: LatentCodec  # rows -> latents, latents -> pixels (frozen AE, loaded on first use)
    facts: object  # what the checks learnt (stage2.checks.Facts)
    read_only: bool = False  # built for a command that only reads the run: nothing may write into it
    labels: RunLabels | None = None  # a class-conditional run's labels (stage2/labels.py)

    def check_writable(self, what: str) -> None:
        """Refuse `what` (a write into the run folder) on a read-only setup."""
        if self.read_only:
            raise RuntimeError(f"{what}: a read-only stage-2 setup writes nothing into {self.layout.root}")

    def discriminator_trainer(
        self, k: int, real, fake, real_train, fake_train, **kwargs
    ) -> DiscriminatorTrainer:
        return DiscriminatorTrainer(
            self.acc,
            self.cfg,
            k,
            self.layout,
            real,
            fake,
            real_train,
            fake_train,
            schedule=self.schedule,
            num_classes=self.labels.conditioning.num_classes if self.labels is not None else 0,
            **kwargs,
        )

    def finetune_trainer(
        self, k: int, real, real_train, d, init: dict, evaluator: Evaluator | None = None, real_labels=None
    ) -> FinetuneTrainer:
        quality = (
            evaluator.latent_fd
            if evaluator is not None and self.cfg.stage2.best_metric == "val_latent_fd"
            else None
        )
        return FinetuneTrainer(
            self.acc,
            self.cfg,
            k,
            self.layout,
            self.stage1,
            self.schedule,
            self.codec.ae_path,
            real,
            real_train,
            d,
            init,
            quality=quality,
            labels=self.labels,
            real_labels=real_labels,
        )

    def evaluator(self) -> Evaluator:
        decode = self.codec.decode if self.facts.ae is not None else None
        return Evaluator(
            self.acc,
            self.cfg,
            self.layout.summary,
            self.rows,
            self.codec.encode,
            decode,
            self.schedule,
            self.latent_shape,
            self.log,
            read_only=self.read_only,
            conditioning=self.stage1.conditioning,
        )


def setup(cfg: Config, accelerator, read_only: bool = False) -> Stage2Setup:
    """Run every check that can fail before compute (files, columns, channels, sizes, N, saved latents, a
    changed config; input files sharded, a failure on any rank stops all ranks), then read the stage-1
    model once. read_only: for a command that only reads the run (module docstring); writes nothing."""
    facts = start_checks(cfg, accelerator, read_only=read_only)
    stage1 = load_diffusion_checkpoint(
        facts.stage1.path, fallback_scheduler=facts.stage1.scheduler, scaling=stage1_scaling(facts)
    )
    latent_shape = tuple(facts.latent_shape)
    codec = LatentCodec(
        accelerator,
        ae_path(cfg, facts.stage1),
        stage1.scaling,
        latent_shape,
        resolution=cfg.dataset.resolution,
        batch_size=cfg.autoencoder.encode_batch_size,
        num_workers=cfg.training.num_workers,
    )
    return Stage2Setup(
        cfg=cfg,
        acc=accelerator,
        layout=RunLayout.of(cfg),
        log=Logger(accelerator, "stage2"),
        stage1=stage1,
        # the stage-1 model's schedule; scheduler.timestep_spacing (null: the model's own) sets how every
        # sampler of the run (fakes, rollouts, evaluation, grids) and every checkpoint it writes space K steps
        schedule=Schedule.from_dict(stage1.scheduler).with_spacing(cfg.scheduler.timestep_spacing),
        latent_shape=latent_shape,
        rows=facts.rows,
        codec=codec,
        facts=facts,
        read_only=read_only,
        labels=RunLabels.of(cfg, stage1.conditioning, facts.rows),
    )


def stage1_scaling(facts) -> LatentScaling:
    """The latent scale and shift: the starting model's own, else (a bare UNet folder) the AE config's."""
    if facts.stage1.scaling is not None:
        return facts.stage1.scaling
    return scaling_from_config(facts.ae or {})


def complete(layout: RunLayout, k: int) -> bool:
    """Whether iteration k's fine-tune finished (its latest checkpoint says so). Read weights only
    (memory-mapped: its tensors are not read); one the weights-only loader refuses (it could run code)
    stops the run."""
    from trainer.files.read import UnsafeFileError, torch_load

    path = layout.diffusion_checkpoint(k, "latest")
    if not path.is_file():
        return False
    try:
        return bool(torch_load(path, "checkpoint").get("complete"))
    except UnsafeFileError as e:
        raise UserError(f"{e}; delete it to restart iteration {k}'s diffusion phase") from None
    except Exception:
        return False


def result(s: Stage2Setup, k: int):
    """Iteration k's result, the checkpoint iteration k+1 continues from (stage2.continue_from): what its
    grid and summary row show."""
    return s.layout.diffusion_checkpoint(k, s.cfg.stage2.continue_from)


def iteration_discriminator(layout: RunLayout, k: int):
    """The D iteration k's fine-tune ended with: the online D where one was trained, else the offline best."""
    online = layout.discriminator_online(k)
    return online if online.is_file() else layout.discriminator_best(k)


def weights_of(path) -> dict:
    ck = load_diffusion_checkpoint(path)
    return {"raw": ck.raw_weights if ck.raw_weights is not None else ck.weights, "ema": ck.weights}


def new_unet(s: Stage2Setup, weights: dict):
    return s.stage1.new_unet(weights)
