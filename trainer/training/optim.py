"""Optimizers and learning-rate schedules of the trainers."""

from __future__ import annotations

import math

import torch

from trainer.parallel.accelerator import fast_optimizer


def cosine_with_warmup(step: int, warmup: int, total: int, kind: str = "cosine") -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, lr: float, weight_decay: float, name: str = "AdamW", betas=None, **extra):
    """AdamW (or Adam) over `params`; `extra` carries device-specific switches (e.g. fused kernels)."""
    cls = torch.optim.AdamW if name == "AdamW" else torch.optim.Adam
    if betas is not None:
        extra["betas"] = tuple(betas)
    return cls(params, lr=lr, weight_decay=weight_decay, **extra)


def optimizer_from(params, section, performance=None, accelerator=None, lr: float | None = None):
    """The optimizer a config section describes, over `params` (parameters or param groups):
    `section.optimizer` (AdamW where the section names none), `lr` (default `section.learning_rate`),
    `section.weight_decay` and `section.betas` (the optimizer's own default where the section has none).
    With `performance` (the performance: section) and `accelerator`, the device switches of
    `fast_optimizer` too (fused kernels on CUDA); without them, none."""
    extra = {} if performance is None else fast_optimizer(performance, accelerator)
    return build_optimizer(
        params,
        section.learning_rate if lr is None else lr,
        section.weight_decay,
        getattr(section, "optimizer", "AdamW"),
        getattr(section, "betas", None),
        **extra,
    )


def build_lr_schedule(opt, warmup: int, total: int, kind: str = "cosine", offset: int = 0):
    """Linear warm-up then `kind`, stepped by hand once per applied optimizer step: the schedule is in
    global steps whatever the world size. `offset`: the curve's step at this optimizer's first step (a
    schedule that spans several phases, each a slice of `total`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: cosine_with_warmup(step + offset, warmup, total, kind)
    )
