"""Stage 2: adversarial fine-tuning (`accelerate launch -m trainer.stage2 CONFIG`). `run` orchestrates the
iterations; each phase has its module: generation, the discriminator and fine-tune trainers; `checks` runs
before compute, `prepare` builds what the iterations share (read-only for commands that only read a run),
`outputs` writes grids, report and pipeline folder. Quality lives in trainer/quality/."""

from trainer.stage2.checks import check_stage2
from trainer.stage2.discriminator_trainer import D_FORMAT, check_r1_supported, load_discriminator
from trainer.stage2.distribution_matching import check_distribution_matching_supported
from trainer.stage2.feature_discriminator import new_head
from trainer.stage2.finetune_columns import check_grad_ratio_supported
from trainer.stage2.generation import choose_real_rows, generate_own, produce_gathered, stratified_split
from trainer.stage2.outputs import refresh_report, result_weights, write_comparison
from trainer.stage2.prepare import Stage2Setup, complete, setup
from trainer.stage2.run import run

__all__ = [
    "D_FORMAT",
    "Stage2Setup",
    "check_distribution_matching_supported",
    "check_grad_ratio_supported",
    "check_r1_supported",
    "check_stage2",
    "choose_real_rows",
    "complete",
    "generate_own",
    "load_discriminator",
    "new_head",
    "produce_gathered",
    "refresh_report",
    "result_weights",
    "run",
    "setup",
    "stratified_split",
    "write_comparison",
]
