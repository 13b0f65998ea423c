"""Stage 1: train the diffusion UNet on frozen-AE latents (`python -m trainer.stage1 CONFIG`)."""
