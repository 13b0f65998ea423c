"""The Accelerator and process-aware logging. The only place a trainer gets its Accelerator."""
from __future__ import annotations

import os

import torch

from trainer.core.errors import UserError
from trainer.core.log import warn
from trainer.dist import engine


def set_deterministic(on: bool) -> None:
    """training.deterministic: kernels that repeat bit for bit on GPU (see docs/REPRODUCIBILITY.md)."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any CUDA work
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def apply_performance(perf) -> None:
    """Process-wide switches of the `performance:` section (TF32)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(perf.tf32)
        torch.backends.cudnn.allow_tf32 = bool(perf.tf32)


def fast_optimizer(perf, acc) -> dict:
    """Extra AdamW/Adam arguments: fused kernels on CUDA when asked (DeepSpeed brings its own)."""
    if perf.fused_optimizer and acc.device.type == "cuda" and not engine.is_deepspeed(acc):
        return {"fused": True}
    return {}


def prepare_module(model, perf, acc):
    """A model about to be trained or sampled: on the device first when its optimizer is fused (the
    fused kernels check the parameters' device when built), channels-last when asked."""
    if fast_optimizer(perf, acc):
        model = model.to(acc.device)
    if perf.channels_last and acc.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_accelerator(device: str = "auto", mixed_precision: str = "no", report_to: str | None = None,
                      project_dir=None, run_name: str = "advdiff"):
    """An Accelerator on `device` ("auto", "cpu" or "cuda") with the given mixed precision, and
    accelerate's trackers (e.g. tensorboard, logging under project_dir) when `report_to` is set."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device: expected auto, cpu or cuda, got \"{device}\"")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    no_cuda = device == "cpu" or not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # cpu=True makes accelerate silently drop DeepSpeed, so a DeepSpeed run on CPU (DS_ACCELERATOR=cpu)
    # must not ask for it; DeepSpeed then runs on its own CPU accelerator.
    cpu = (no_cuda or os.environ.get("ACCELERATE_USE_CPU") == "1") and not deepspeed
    kwargs = []
    if no_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo is the only CPU backend; without naming it, DeepSpeed on CPU sees one process per rank.
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))
    if deepspeed and no_cuda and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise UserError("DeepSpeed without CUDA needs DS_ACCELERATOR=cpu in the environment")
    tracking = {}
    if report_to:
        if report_to == "tensorboard":
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise UserError("--report_to tensorboard: tensorboard is not installed "
                                "(pip install 'advdiff[tracking]')")
        tracking = {"log_with": report_to, "project_dir": str(project_dir)}
    if deepspeed:
        # Two plugins, both from the launcher's DeepSpeed config: the first is active and serves every
        # phase's one trained model; the second backs the Accelerator of a second model trained in the
        # same phase (the online discriminator, engine.prepare_second). One Accelerator holds one engine.
        from accelerate.utils import DeepSpeedPlugin

        tracking["deepspeed_plugins"] = {engine.MAIN_PLUGIN: DeepSpeedPlugin(), engine.SECOND_PLUGIN: DeepSpeedPlugin()}
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=kwargs, **tracking)
    if report_to:
        acc.init_trackers(run_name)
    if acc.is_main_process and acc.device.type == "cpu" and mixed_precision == "fp16":
        warn("mixed_precision fp16 has no effect on CPU: PyTorch runs these models in fp32 there")
    return acc
