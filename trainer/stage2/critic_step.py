"""The one D step every critic takes, and the one guarded update of a helper network's own optimizer.

`critic_loss` is the discriminator's objective on a batch of logits, reals first: the configured D loss
(discriminator.training.loss), R1 on the reals' inputs where r1_gamma > 0, and the batch's accuracy. The
offline D (discriminator_trainer.py), the online D (critics.py) and the feature head on the fake score
(feature_discriminator.py) all call it.

`guarded_update` is how a helper network with its own optimizer behind a second wrapper (the online D,
the fake score; engine.prepare_second) steps: a non-finite loss on any rank skips the update on every
rank (no rank runs a lone backward), else backward with the rank's weight, clip (DeepSpeed clips in its
engine) and step. The generator and the offline D step through the StepTrainer's GuardedUpdate instead,
which also keeps the run's skip counters and checkpoints.
"""

from __future__ import annotations

import torch

from trainer.parallel import engine
from trainer.parallel.collectives import all_reduce_sum
from trainer.training.losses import d_loss, r1_term


def r1_inputs(td, real: torch.Tensor) -> torch.Tensor:
    """The reals as D's step takes them: requiring grad where R1 needs their input gradient."""
    return real.detach().requires_grad_(True) if td.r1_gamma > 0 else real


def critic_loss(td, logits: torch.Tensor, real_inputs: torch.Tensor):
    """(loss, accuracy) of D's logits on a batch of len(real_inputs) reals, then fakes; real_inputs: the
    reals' inputs (r1_inputs), which R1 differentiates."""
    n = len(real_inputs)
    lr_, lf = logits[:n].float(), logits[n:].float()
    loss = d_loss(td.loss, lr_, lf)
    if td.r1_gamma > 0:
        loss = loss + td.r1_gamma * r1_term(lr_, real_inputs)
    accuracy = ((lr_ > 0).float().sum() + (lf < 0).float().sum()) / max(1, len(logits))
    return loss, accuracy


def guarded_update(main, second, opt, parameters, loss, weight: float, max_grad_norm: float) -> bool:
    """One update of a helper network on this rank's loss (call on every rank): main is the run's
    Accelerator, second the one that owns the helper's wrapper. Returns False where a non-finite loss on
    some rank skipped it."""
    bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1).to(main.device))
    if float(bad) > 0:
        opt.zero_grad(set_to_none=True)
        return False
    second.backward(loss * weight)
    if max_grad_norm > 0 and not engine.is_deepspeed(second):
        second.clip_grad_norm_(parameters, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return True
