"""The optimizer's fields, declared once. Every section that trains a network (stage 0's autoencoder,
`training` for stage 1 and the fine-tune, the latent D, distribution matching's fake score) takes its
learning rate, weight decay and Adam betas from these builders, each with its own default and doc line,
and one rule checks the betas. trainer.training.optim.optimizer_from builds every optimizer from them."""

from __future__ import annotations

from trainer.config.schema import error_at, option


def learning_rate(default: float, doc: str):
    return option(default, doc, gt=0)


def weight_decay(default: float, doc: str):
    return option(default, doc, ge=0)


def betas(default: tuple[float, float], doc: str):
    return option(doc=doc, factory=lambda: list(default))


def check_betas(section, where: str, prefix: str) -> None:
    """Adam's two betas, each in [0, 1): the one rule, for every section with a `betas` field."""
    if len(section.betas) != 2 or not all(0 <= b < 1 for b in section.betas):
        raise error_at(where, f"{prefix}.betas", "two numbers in [0, 1)", section.betas)
