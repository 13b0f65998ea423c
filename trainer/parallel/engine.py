"""The few places where DeepSpeed differs from DDP, in one file.

Design: each phase trains one model (stage 1: the UNet; stage 2: D in the discriminator phase, then
the UNet in the fine-tune phase with D frozen and unwrapped), so one Accelerator prepares one DeepSpeed
engine at a time and `free_memory()` destroys it before the next phase. The exception is a second
model trained beside the UNet in the fine-tune phase (the online discriminator, or the distribution-
matching fake score; not both): it gets a second Accelerator on a second plugin (prepare_second).
Batch size and clipping are set in the DeepSpeed config before each prepare (there are no DataLoaders
for accelerate to read them from).
Under ZeRO-3 a module's parameters are partitioned: full copies are gathered (a collective, on
every rank) only to read or write weights, and forwards go through the engine.
Gradient accumulation (`training.gradient_accumulation_steps`) is the trainers' own: N micro-batches'
backwards add up, DDP all-reducing on the last only (grad_sync). It is refused under DeepSpeed, which
keeps `gradient_accumulation_steps: 1` in its config (check_accumulation, before any compute).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from trainer.core.errors import UserError
from trainer.parallel.collectives import barrier, shard_range

# the two DeepSpeed plugins of a DeepSpeed run (dist.accelerator.build_accelerator)
MAIN_PLUGIN, SECOND_PLUGIN = "main", "second"


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(
        accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    )


def prepare(accelerator, model, optimizer, global_batch: int, max_grad_norm: float):
    """accelerator.prepare(model, optimizer), with the DeepSpeed config filled in for this phase."""
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        micro = max(1, len(shard_range(global_batch, 0, accelerator.num_processes)))
        ds["train_micro_batch_size_per_gpu"] = micro
        ds["gradient_accumulation_steps"] = (
            1  # micro-batches are refused under DeepSpeed (check_accumulation)
        )
        ds["train_batch_size"] = micro * accelerator.num_processes
        # 0 disables clipping, as under DDP
        ds["gradient_clipping"] = float(max_grad_norm)
    return accelerator.prepare(model, optimizer)


def check_accumulation(
    accelerator, steps: int, global_batch: int, batch_field: str = "training.batch_size"
) -> None:
    """Refuse, with one line and before any compute, gradient accumulation where it cannot be exact: under
    DeepSpeed (its engine would own the micro-steps, the loss scaling and the clipping), or with a global
    batch that does not split into `steps` equal micro-batches on every process."""
    field = "training.gradient_accumulation_steps"
    if steps <= 1:
        return
    if is_deepspeed(accelerator):
        raise UserError(
            f"{field}: {steps} is not supported under DeepSpeed; set it to 1 (ZeRO already "
            "partitions the optimizer state and gradients), or train with DDP"
        )
    unit = steps * accelerator.num_processes
    if global_batch % unit:
        raise UserError(
            f"{batch_field}: {global_batch} does not split into {field} ({steps}) equal micro-batches "
            f"on each of {accelerator.num_processes} process(es); expected a multiple of {unit}"
        )


def grad_sync(accelerator, wrapped, sync: bool):
    """Around one micro-batch's forward and backward: DDP all-reduces the gradients only when `sync` (the
    last micro-batch of an optimizer step); before it they add up locally (accelerate's no_sync)."""
    return contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)


def prepare_second(accelerator, model, optimizer, global_batch: int, max_grad_norm: float):
    """Prepare a second model trained in the same phase as `accelerator`'s (the online discriminator
    beside the UNet): returns (its accelerator, wrapped model, optimizer). Under DDP that is `accelerator`
    itself (it wraps any number of models). Under DeepSpeed one Accelerator holds one engine, so the
    second model gets a second Accelerator on the state's second plugin; the first plugin is active again
    afterwards. Its backward and optimizer step go through the returned accelerator; its parameters must
    be frozen while the first model's loss back-propagates through it (ZeRO hooks every trainable
    parameter)."""
    if not is_deepspeed(accelerator):
        return (accelerator, *prepare(accelerator, model, optimizer, global_batch, max_grad_norm))
    from accelerate import Accelerator

    state = accelerator.state
    state.select_deepspeed_plugin(SECOND_PLUGIN)
    try:
        second = Accelerator()
        wrapped, opt = prepare(second, model, optimizer, global_batch, max_grad_norm)
    finally:
        state.select_deepspeed_plugin(MAIN_PLUGIN)
    return second, wrapped, opt


@contextlib.contextmanager
def full_parameters(accelerator, module, modifier_rank=None):
    """Inside, `module`'s parameters are whole on every rank (ZeRO-3 gathers them; a collective)."""
    if zero_stage(accelerator) == 3 and any(hasattr(p, "ds_id") for p in module.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
            yield
    else:
        yield


def state_dict(accelerator, module) -> dict:
    """A CPU copy of the full weights. Call on every rank (ZeRO-3 gathers)."""
    with full_parameters(accelerator, module):
        return {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in module.state_dict().items()
        }


def load_state_dict(accelerator, module, weights: dict) -> None:
    """Load full weights into a (possibly partitioned) module. Call on every rank."""
    with full_parameters(accelerator, module, modifier_rank=0):
        if accelerator.is_main_process or zero_stage(accelerator) != 3:
            module.load_state_dict(weights)


def forward_module(accelerator, wrapped, plain):
    """The module to call for a forward outside the training step: under DeepSpeed the engine
    (ZeRO-3 parameters exist only inside its forward), otherwise the plain module (no DDP hooks)."""
    return wrapped if is_deepspeed(accelerator) else plain


def save_engine_state(accelerator, folder: Path) -> None:
    """DeepSpeed's own checkpoint (every rank writes its partitions), swapped in atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    accelerator.save_state(str(tmp))
    barrier()
    if accelerator.is_main_process:
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_engine_state(accelerator, folder: Path) -> None:
    accelerator.load_state(str(folder))


# -- a second model's optimizer in a phase's resume state (the online D, the fake score) ----------------
def second_optimizer_state(accelerator, opt, engine_folder):
    """The optimizer's part of a resume state (call on every rank): its state dict, or None under DeepSpeed,
    whose partitions go to the engine's own checkpoint in `engine_folder`."""
    if is_deepspeed(accelerator):
        save_engine_state(accelerator, Path(engine_folder))
        return None
    return opt.state_dict()


def load_second_optimizer_state(accelerator, opt, saved, engine_folder, what: str) -> None:
    """Restore what second_optimizer_state saved; `what` names the model in the error of a missing state."""
    if not is_deepspeed(accelerator):
        if saved is not None:
            opt.load_state_dict(saved)
        return
    from trainer.files.read import check_torch_files

    then = "; delete it and the fine-tune's latest checkpoint beside it to restart the diffusion phase"
    if not Path(engine_folder).is_dir():
        raise UserError(f"{engine_folder}: the {what}'s DeepSpeed state is missing{then}")
    # DeepSpeed unpickles its files unrestricted: each must pass a weights-only load first
    check_torch_files(engine_folder, "DeepSpeed state", then)
    load_engine_state(accelerator, Path(engine_folder))
