"""Stage 2: adversarial fine-tuning (`accelerate launch -m trainer.stage2 CONFIG`). `run` orchestrates
the iterations; each phase has its module: generation (fakes and reals, sharded), the
discriminator trainer, the fine-tune trainer and the quality evaluation; `checks` runs before compute."""
