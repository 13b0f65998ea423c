"""The fine-tune's resume fingerprint: the config fields that define its training, so that a resume state
written under other settings is refused (trainer/training/loop.py) instead of continued. The helpers add
their own fields (registry.fingerprint_of: the critic's and each loss term's helper's).

Keys added after the first release are present only when their feature is on, so that states written
before them still resume.
"""

from __future__ import annotations


def finetune_fingerprint(cfg, unet_config: dict, schedule, lr: float, mode: str) -> dict:
    """mode: the sample source's name (samples.py)."""
    s2, t = cfg.stage2, cfg.training
    fingerprint = {
        "unet": unet_config,
        "scheduler": schedule.to_dict(),
        "seed": t.seed,
        "num_samples": s2.num_samples,
        "mode": mode,
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
    if s2.mse_skip_sampler_timesteps:
        fingerprint["mse_skip_sampler_timesteps"] = True
    if s2.backward_simulation:
        fingerprint["backward_simulation"] = True
    if s2.real_batch != "auto":  # the reals a step runs (auto: only where read) change no term's maths
        fingerprint["real_batch"] = s2.real_batch
    return fingerprint
