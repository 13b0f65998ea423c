"""The fine-tune's resume fingerprint: the config fields that define its training, so that a resume state
written under other settings is refused (trainer/training/loop.py) instead of continued.

Keys added after the first release are present only when their feature is on, so that states written
before them still resume.
"""

from __future__ import annotations

from trainer.stage2 import distribution_matching as dmatch
from trainer.stage2 import feature_discriminator as features

# the online (or noise-conditioned) discriminator's training fields
_ONLINE_D_KEYS = (
    "mode",
    "n_critic",
    "online_batch_size",
    "noise_inputs",
    "noise_max_timestep",
    "loss",
    "r1_gamma",
    "learning_rate",
    "betas",
    "weight_decay",
)


def finetune_fingerprint(cfg, unet_config: dict, schedule, lr: float, online_mode: bool) -> dict:
    s2, t, td = cfg.stage2, cfg.training, cfg.discriminator.training
    fingerprint = {
        "unet": unet_config,
        "scheduler": schedule.to_dict(),
        "seed": t.seed,
        "num_samples": s2.num_samples,
        "mode": s2.generator_loss_mode,
        "loss": [dict(x.__dict__) for x in t.loss.losses],
        "lr": lr,
        "batch_size": t.batch_size,
        "generation_steps": s2.generation_steps,
        "eta": s2.eta,
        "rollout_grad_steps": s2.rollout_grad_steps,
        "ema_decay": t.ema_decay,
    }
    if cfg.dataset.label_column:  # a class-conditional run
        fingerprint["labels"] = {"column": cfg.dataset.label_column, "guidance_scale": s2.guidance_scale}
    if s2.train_steps:
        fingerprint["train_steps"] = list(s2.train_steps)
    if s2.grad_ratio_weight:
        fingerprint["grad_ratio_max"] = s2.grad_ratio_max
    if dmatch.enabled(cfg):
        fingerprint["distribution_matching"] = dmatch.fingerprint(cfg)
    if s2.mse_skip_sampler_timesteps:
        fingerprint["mse_skip_sampler_timesteps"] = True
    if online_mode or td.noise_inputs:
        fingerprint["discriminator"] = {k: getattr(td, k) for k in _ONLINE_D_KEYS}
    if features.enabled(cfg):
        fingerprint["feature_discriminator"] = features.fingerprint(cfg)
    return fingerprint
