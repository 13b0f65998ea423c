"""What the fine-tune checks and logs before it builds anything: whether the gradient-norm ratio can run, and
its history's columns."""

from __future__ import annotations

from trainer.core.errors import UserError
from trainer.parallel import engine
from trainer.training.composite import CompositeLoss


def check_grad_ratio_supported(accelerator, s2, micro_batches: int = 1) -> None:
    """The gradient-norm ratio takes whole-batch gradients outside the backward: not in DeepSpeed or
    micro-batches."""
    if s2.grad_ratio_weight and (engine.is_deepspeed(accelerator) or micro_batches > 1):
        raise UserError(
            "stage2.grad_ratio_weight: takes the whole batch's gradients outside the backward, which "
            "DeepSpeed and training.gradient_accumulation_steps > 1 do not allow; set it to false there"
        )


def finetune_columns(loss: CompositeLoss) -> list[str]:
    """The fine-tune history's columns; the loss names its parts' (train_mse, train_adv, val_mse, ...)."""
    return [
        "epoch",
        "step",
        "train_loss",
        *loss.columns("train"),
        "val_loss",
        *loss.columns("val"),
        "d_prob_fake",
        "lr",
        "seconds",
        "d_val_acc",
        "adv_weight",
        "nonfinite_skipped",
    ]
