"""The memory switches (docs/PERFORMANCE.md, "Memory switches"): `training.gradient_checkpointing` and
`training.gradient_accumulation_steps` give the update of the plain step up to float noise, in stage 1 and
in the stage-2 fine-tune; the fields reach the trainers; what they cannot do is refused with one line.

What is compared, and why so: the maths of both switches is the gradient, so the gradients are compared
elementwise, as Adam's first moment (after the first step exactly (1 - beta1) x the gradient; clipping off),
against the largest gradient: float noise measured up to 1e-6 of it, a micro-batch loss summed instead of
averaged is off by (N - 1) x 100 %. The weights after Adam cannot be compared elementwise that tightly:
Adam's step is about lr x g / |g|, so where the exact gradient is zero (attention key biases) its sign is
float noise and moves a weight by up to lr whatever the switch; measured on 66 of 165k weights. They are
compared as the distance between the two runs' weights against the distance the update moved them
(measured 9e-5), which catches anything done per micro-batch that should be done per step (LR schedule,
EMA, optimizer). Each stage runs a deliberately broken variant and checks that the comparison rejects it."""

from types import SimpleNamespace

import pytest
import torch
from helpers import finetune_alone, run_cli, stage2_config, tiny_config

from trainer.config.load import load_config

# pytest-xdist: a module fixture: its tests run on one worker, so the fixture is built once
pytestmark = pytest.mark.xdist_group("test_memory_switches")

# 3 stage-1 steps, one validation at the end; no clipping, so a gradient scaled by N shows in Adam's moments
FAST = {"max_steps": 3, "eval_interval": 3, "log_interval": 3, "max_grad_norm": 0.0, "sample_steps": 1}
GRAD_ATOL = 1e-5  # x the largest first moment
UPDATE_RTOL = 1e-3  # x the size of the update (L2 over all weights)


def _flat(tensors: dict) -> torch.Tensor:
    return torch.cat([tensors[k].detach().flatten().double() for k in sorted(tensors)])


def _moments(opt_state: dict) -> dict:
    return {i: s["exp_avg"] for i, s in opt_state["state"].items()}


def _gradient_error(a: dict, b: dict) -> float:
    """The largest difference of Adam's first moments, relative to the largest first moment."""
    ma, mb = _flat(_moments(a["optimizer"])), _flat(_moments(b["optimizer"]))
    return float((ma - mb).abs().max() / ma.abs().max())


def _update_error(a: dict, b: dict, key: str = "weights") -> float:
    """|b - a| / |a - start| over all weights (L2): how far apart the runs ended against how far they
    moved."""
    wa, wb, w0 = _flat(a[key]), _flat(b[key]), _flat(a[f"start_{key}"])
    return float((wa - wb).norm() / (wa - w0).norm())


def _same_update(a: dict, b: dict) -> bool:
    """a, b: {"weights", "start_weights", "ema", "start_ema", "optimizer" (state_dict), "logs"}: whether b
    made a's update up to float noise."""
    return (
        _gradient_error(a, b) <= GRAD_ATOL
        and _update_error(a, b) <= UPDATE_RTOL
        and _update_error(a, b, "ema") <= UPDATE_RTOL
        and all(abs(a["logs"][k] - b["logs"][k]) <= 1e-5 * max(abs(a["logs"][k]), 1e-6) for k in a["logs"])
    )


def _start(trainer) -> dict:
    return {
        "start_weights": {k: v.detach().clone() for k, v in trainer.unet.state_dict().items()},
        "start_ema": dict(enumerate(s.clone() for s in trainer.ema.shadow)),
    }


# -- stage 1 ------------------------------------------------------------------------------------------
def _stage1(root, manifest, ae, before_fit=None, **training) -> dict:
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    cfg = load_config(tiny_config(root, manifest, ae, **{**FAST, **training}))
    trainer = DiffusionTrainer(cfg, build_accelerator("cpu"))
    start = _start(trainer)
    if before_fit is not None:
        before_fit(trainer)
    trainer.fit()
    state = torch.load(cfg.out_dir / "stage1" / "state.pt", map_location="cpu", weights_only=True)
    row = state["history"][-1] if state["history"] else {}  # (none when stopped before the validation)
    return {
        "weights": state["model"]["unet"],
        "optimizer": state["model"]["optimizer"],
        "ema": dict(enumerate(state["model"]["ema"]["shadow"])),
        **start,
        "logs": {k: row[k] for k in ("train_mse", "val_mse") if k in row},
    }


@pytest.fixture(scope="module")
def plain_stage1(tmp_path_factory, digits_manifest, small_ae):
    return _stage1(tmp_path_factory.mktemp("plain"), digits_manifest, small_ae)


def test_stage1_accumulation_gives_the_same_update(
    tmp_path, digits_manifest, small_ae, plain_stage1, monkeypatch
):
    from trainer.parallel import engine

    seen = {"batches": [], "sync": []}
    grad_sync = engine.grad_sync

    def spy_sync(acc, wrapped, sync):
        seen["sync"].append(sync)
        return grad_sync(acc, wrapped, sync)

    def spy(trainer):
        trainer.unet.register_forward_pre_hook(lambda m, args: seen["batches"].append(args[0].shape[0]))

    monkeypatch.setattr(engine, "grad_sync", spy_sync)
    micro = _stage1(tmp_path / "n4", digits_manifest, small_ae, spy, gradient_accumulation_steps=4)
    # the field reached the trainer: each of the 3 steps ran 4 micro-batches of 16 / 4, DDP syncing on the
    # last only
    assert seen["batches"] == [4] * 12
    assert seen["sync"] == [False, False, False, True] * 3
    assert _same_update(
        plain_stage1, micro
    )  # weights, EMA (one EMA step per optimizer step), gradients, losses

    # the comparison can fail: micro-batch losses summed (each weighted as the whole batch) are rejected
    import trainer.stage1.diffusion_trainer as stage1

    monkeypatch.setattr(stage1, "local_weight", lambda n, n_global, world: 1.0)
    summed = _stage1(tmp_path / "summed", digits_manifest, small_ae, gradient_accumulation_steps=4)
    assert not _same_update(plain_stage1, summed)
    assert _gradient_error(plain_stage1, summed) > 2.5  # 4 micro-batch means summed: 4 x the gradient


def test_stage1_gradient_checkpointing_gives_the_same_update(
    tmp_path, digits_manifest, small_ae, plain_stage1
):
    calls = {"plain": 0, "checkpointed": 0}

    def count(name):
        def attach(trainer):
            block = trainer.unet.down_blocks[0]
            assert block.gradient_checkpointing is (name == "checkpointed")  # the field reached the UNet
            forward = block.resnets[0].forward

            def counted(*args, **kwargs):  # (forward hooks do not fire in checkpointing's recomputation)
                calls[name] += 1
                return forward(*args, **kwargs)

            block.resnets[0].forward = counted

        return attach

    # a second plain run only to count its forwards (the trained weights are plain_stage1's)
    _stage1(tmp_path / "plain", digits_manifest, small_ae, count("plain"), max_steps=1, eval_interval=1)
    checkpointed = _stage1(
        tmp_path / "ckpt", digits_manifest, small_ae, count("checkpointed"), gradient_checkpointing=True
    )
    assert _same_update(plain_stage1, checkpointed)
    # activations were recomputed in backward: each checkpointed block ran twice per training step
    assert calls == {"plain": 1, "checkpointed": 2 * 3}


def test_resume_across_accumulation_settings(tmp_path, digits_manifest, small_ae, plain_stage1):
    """The state format is unchanged and the setting is not part of the resume fingerprint: a run stopped
    at step 1 without accumulation continues with 2 micro-batches and ends where the plain run ended."""
    _stage1(tmp_path, digits_manifest, small_ae, lambda trainer: setattr(trainer, "stop_after", 1))
    resumed = _stage1(tmp_path, digits_manifest, small_ae, gradient_accumulation_steps=2)
    assert _same_update(plain_stage1, resumed)


# -- the stage-2 fine-tune --------------------------------------------------------------------------------
def _finetune(root, manifest, ae, ckpt, mode, micro, wrap_terms=None, steps=2, **training) -> dict:
    """`steps` fine-tune steps of a FinetuneTrainer on fixed real latents and a fixed noise-conditioned D."""

    loss = [
        {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 1.0},
        {
            "type": "DiscriminatorLoss",
            "key": "latent" if mode == "rollout" else "pred_latent",
            "target": None,
            "weight": 0.5,
        },
    ]
    # rollout: 6 rollouts in 4 micro-batches (2, 2, 1, 1), noised for D; x0_pred: D scores only t < 500, so
    # the micro-batches hold different numbers of scored samples
    stage2 = (
        {"generator_loss_mode": "rollout", "rollout_grad_steps": 2, "rollout_batch_size": 6}
        if mode == "rollout"
        else {"generator_loss_mode": "x0_pred", "x0_pred_max_timestep": 0.5}
    )
    cfg = load_config(stage2_config(root, manifest, ae, ckpt, stage2=stage2, loss=loss))
    cfg.discriminator.config.noise_conditioned = True
    cfg.discriminator.training.noise_inputs = mode == "rollout"
    cfg.training.max_grad_norm, cfg.training.gradient_accumulation_steps = 0.0, micro
    for key, value in training.items():
        setattr(cfg.training, key, value)
    trainer = finetune_alone(cfg)
    start = _start(trainer)
    if wrap_terms is not None:
        trainer.loss.terms = [wrap_terms(term) for term in trainer.loss.terms]
    logs = {}
    for step in range(steps):
        for key, value in trainer.train_step(step).items():
            logs[f"{key}_{step}"] = value
    return {
        "weights": {k: v.detach().clone() for k, v in trainer.unet.state_dict().items()},
        "optimizer": trainer.opt.state_dict(),
        "ema": dict(enumerate(trainer.ema.shadow)),
        "logs": logs,
        "trainer": trainer,
        **start,
    }


class Summed:
    """A loss term whose value is not scaled to its micro-batch's share: the micro-batches' losses then add up
    to N times the batch's (the bug the comparisons must catch)."""

    def __init__(self, term, n: int):
        self.term, self.n, self.weight = term, n, term.weight

    def __getattr__(self, name):  # what the term declares: part, role, samples, needs_discriminator
        return getattr(self.term, name)

    def __call__(self, outputs, ctx):
        return self.term(outputs, ctx) * self.n


@pytest.mark.parametrize("mode", ["rollout", "x0_pred"])
def test_finetune_accumulation_gives_the_same_update(tmp_path, digits_manifest, small_ae, stage1_ckpt, mode):
    plain = _finetune(tmp_path / "n1", digits_manifest, small_ae, stage1_ckpt, mode, 1)
    micro = _finetune(tmp_path / "n4", digits_manifest, small_ae, stage1_ckpt, mode, 4)
    assert plain["logs"]["adv_0"] > 0 and plain["logs"]["mse_0"] > 0
    assert _same_update(plain, micro)
    assert (
        plain["trainer"].ema.num_updates == micro["trainer"].ema.num_updates == 2
    )  # one EMA step per update
    assert plain["trainer"].sched.last_epoch == micro["trainer"].sched.last_epoch == 2  # LR: per update
    # the comparison can fail: the adversarial term summed over micro-batches instead of averaged
    broken = _finetune(
        tmp_path / "summed",
        digits_manifest,
        small_ae,
        stage1_ckpt,
        mode,
        4,
        steps=1,
        wrap_terms=lambda term: Summed(term, 4) if term.needs_discriminator else term,
    )
    assert abs(broken["logs"]["adv_0"] - plain["logs"]["adv_0"]) > 0.5 * plain["logs"]["adv_0"]
    plain_first = _finetune(tmp_path / "n1_first", digits_manifest, small_ae, stage1_ckpt, mode, 1, steps=1)
    assert not _same_update(plain_first, broken)


def test_finetune_gradient_checkpointing_from_either_field(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    plain = _finetune(tmp_path / "plain", digits_manifest, small_ae, stage1_ckpt, "rollout", 1, steps=1)
    on = _finetune(
        tmp_path / "on",
        digits_manifest,
        small_ae,
        stage1_ckpt,
        "rollout",
        2,
        steps=1,
        gradient_checkpointing=True,
    )
    assert (
        on["trainer"].unet.is_gradient_checkpointing and not plain["trainer"].unet.is_gradient_checkpointing
    )
    assert _same_update(plain, on)  # checkpointing and 2 micro-batches together: still the plain update


# -- refusals ----------------------------------------------------------------------------------------------
def test_refusals_name_the_field():
    from accelerate.utils import DistributedType

    from trainer.core.errors import UserError
    from trainer.parallel.engine import check_accumulation
    from trainer.stage2.finetune_columns import check_grad_ratio_supported

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    check_accumulation(ddp, 2, 64)
    check_accumulation(ddp, 1, 63)  # without accumulation nothing new is asked of the batch
    with pytest.raises(
        UserError,
        match=r"^training\.batch_size: 60 does not split into training\."
        r"gradient_accumulation_steps \(4\) .* expected a multiple of 8$",
    ):
        check_accumulation(ddp, 4, 60)
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2)
    with pytest.raises(
        UserError, match=r"^training\.gradient_accumulation_steps: 2 is not supported under DeepSpeed"
    ):
        check_accumulation(deepspeed, 2, 64)
    check_accumulation(deepspeed, 1, 64)
    ratio = SimpleNamespace(grad_ratio_weight=True)
    check_grad_ratio_supported(ddp, ratio, 1)
    with pytest.raises(UserError, match=r"^stage2\.grad_ratio_weight: .*gradient_accumulation_steps > 1"):
        check_grad_ratio_supported(ddp, ratio, 2)


def test_indivisible_batch_is_one_line_before_any_compute(tmp_path, digits_manifest, small_ae):
    cfg = tiny_config(tmp_path, digits_manifest, small_ae)
    proc = run_cli(
        "-m",
        "trainer.cli",
        "stage1",
        str(cfg),
        "--device",
        "cpu",
        "--set",
        "training.gradient_accumulation_steps=3",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "advdiff: error: training.batch_size: 16 does not split into training."
        "gradient_accumulation_steps (3) equal micro-batches on each of 1 process(es); "
        "expected a multiple of 3"
    )
    assert not (tmp_path / "out" / "stage1").exists()  # nothing encoded or written
