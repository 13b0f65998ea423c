"""Inputs: the manifest and its images, the embedded digits, and real latents (pre-embedded files
or the frozen autoencoder, encoded sharded by row)."""
