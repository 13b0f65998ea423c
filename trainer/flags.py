"""The stage-2 command-line flags (light: `advdiff validate` parses them without loading models)."""

# flag -> config path; the spec's nine flags and the original's extras
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
