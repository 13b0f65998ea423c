"""stage2.lr_schedule: the fine-tune's own LR schedule, apart from stage 1's training.scheduler.type."""

import pytest
from helpers import finetune_alone, stage2_config

from trainer.config.load import load_config

MSE = {"type": "MSELoss", "key": "model_output", "target": "model_target", "weight": 1.0}


def _config(root, manifest, ae, ckpt, **stage2):
    return stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        loss=[MSE],
        stage2={"num_samples": 24, "diffusion_max_steps": 3, "val_samples": 4, "grid_samples": 0, **stage2},
    )


def _trainer(path, k=0):
    """The fine-tune phase of iteration k alone, on 24 random latents with a fresh D (seeded alike)."""
    return finetune_alone(path, k)


@pytest.mark.parametrize(("lr_schedule", "constant"), [(None, False), ("constant", True), ("cosine", False)])
def test_stage2_lr_schedule_overrides_stage_1s(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, lr_schedule, constant
):
    """stage2.lr_schedule: constant keeps the fine-tune's lr flat whatever training.scheduler.type (cosine
    here, stage 1's); unset, the fine-tune follows training.scheduler.type."""
    path = _config(
        tmp_path, digits_manifest, small_ae, stage1_ckpt, diffusion_epochs=50, lr_schedule=lr_schedule
    )
    assert load_config(path).training.scheduler.type == "cosine"
    trainer = _trainer(path)
    total = trainer.max_steps
    assert total >= 3, total
    factors = [trainer.sched.lr_lambdas[0](step) for step in (0, total // 3, 2 * total // 3)]
    assert (factors == [1.0, 1.0, 1.0]) == constant, factors
    assert factors[0] == 1.0 and (constant or 0.0 < factors[2] < factors[1] < 1.0), factors


def test_cosine_run_is_one_curve_over_every_iteration(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    """cosine_run: iteration k's steps are the k-th slice of one cosine over all iterations' steps, so each
    iteration starts where the last one ended and only the last one ends at 0."""
    from trainer.training.optim import cosine_with_warmup

    path = _config(
        tmp_path, digits_manifest, small_ae, stage1_ckpt, num_iterations=3, lr_schedule="cosine_run"
    )
    curves = []
    for k in range(3):
        trainer = _trainer(path, k)
        n = trainer.max_steps
        curves.append([trainer.sched.lr_lambdas[0](step) for step in range(n + 1)])
    total = 3 * n
    whole = [cosine_with_warmup(step, 0, total) for step in range(total + 1)]
    for k, curve in enumerate(curves):
        assert curve == whole[k * n : (k + 1) * n + 1], k  # its slice of the one curve
    assert curves[0][0] == 1.0 and curves[2][-1] == 0.0 and 0.0 < curves[1][0] < 1.0
    assert curves[1][0] == curves[0][-1]  # iteration 1 starts where iteration 0 ended
