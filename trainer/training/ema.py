"""Exponential moving average of weights, kept in fp32 whatever the training precision.

Our own rather than diffusers' EMAModel: that one reaches for DeepSpeed's ZeRO-3 gather on its own
(and fails where DeepSpeed is not imported); here the caller gathers (engine.full_parameters).
"""

from __future__ import annotations

import torch

from trainer.parallel import engine


class EMA:
    def __init__(self, parameters, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in parameters]

    def current_decay(self) -> float:
        # Warm-up: average over roughly the steps seen so far until the nominal decay takes over.
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self, parameters) -> None:
        parameters = list(parameters)
        if parameters and self.shadow and self.shadow[0].device != parameters[0].device:
            # follow the model to its device once, instead of copying every step
            self.shadow = [s.to(parameters[0].device) for s in self.shadow]
        d = self.current_decay()
        self.num_updates += 1
        for s, p in zip(self.shadow, parameters, strict=True):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for s, p in zip(self.shadow, parameters, strict=True):
            p.copy_(s.to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": [s.cpu() for s in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = [s.to(old.device) for s, old in zip(state["shadow"], self.shadow, strict=True)]


def sync_eval_copy(ema: EMA | None, eval_model, accelerator, model):
    """`eval_model` with the weights to evaluate and export: the EMA's where there is one, else `model`'s
    current weights (gathered under ZeRO-3: call on every rank)."""
    if ema is not None:
        ema.copy_to(eval_model.parameters())
    else:
        eval_model.load_state_dict(engine.state_dict(accelerator, model))
    return eval_model
