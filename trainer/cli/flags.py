"""The stage-2 command-line flags, shared by `advdiff stage2` and `advdiff validate` (light: no models
are loaded to parse them)."""

# flag -> (config path, type, help): the nine documented stage-2 flags, then the batch, step-cap,
# interval, eta and generator-loss-mode extras
FLAGS = {
    "num_samples": ("stage2.num_samples", int, "real and fake samples per iteration (default 5000)"),
    "num_iterations": ("stage2.num_iterations", int, "adversarial iterations (default 3)"),
    "discriminator_epochs": ("discriminator.training.epochs", int, "D epochs per iteration (default 50)"),
    "diffusion_epochs": ("stage2.diffusion_epochs", int, "diffusion epochs per iteration (default 50)"),
    "generation_batch_size": ("stage2.generation_batch_size", int, "DDIM batch per process (default 32)"),
    "generation_steps": ("stage2.generation_steps", int, "DDIM steps (default 100)"),
    "discriminator_max_steps": ("discriminator.training.max_steps", int, "cap on D steps per iteration"),
    "diffusion_max_steps": ("stage2.diffusion_max_steps", int, "cap on diffusion steps per iteration"),
    "discriminator_batch_size": ("discriminator.training.batch_size", int, "global D batch (default 64)"),
    "discriminator_eval_interval": ("discriminator.training.eval_interval", int, "D steps between validations"),
    "diffusion_eval_interval": ("stage2.diffusion_eval_interval", int, "diffusion steps between validations"),
    "eta": ("stage2.eta", float, "DDIM eta (default 0)"),
    "generator_loss_mode": ("stage2.generator_loss_mode", str, "rollout (default) or x0_pred"),
}


def add_stage2_flags(parser) -> None:
    """Every stage-2 flag on `parser` (each overrides its config path; unset flags change nothing)."""
    for flag, (_, typ, help_) in FLAGS.items():
        parser.add_argument(f"--{flag}", type=typ, default=None, help=help_)


def flag_overrides(args) -> dict:
    """The config overrides of the stage-2 flags that were given: {config path: value}."""
    return {path: getattr(args, flag) for flag, (path, _, _) in FLAGS.items() if getattr(args, flag) is not None}
