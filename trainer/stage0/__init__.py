"""Stage 0: train the small autoencoder (`python -m trainer.stage0 CONFIG`)."""
