"""The demo's teacher row: the stage-1 model stage 2 starts from (its EMA weights) at training.sample_steps
DDIM steps, measured once, exactly as `advdiff evaluate CONFIG --generation_steps STEPS` measures it (the
run's Evaluator: the summary's metric samples, seeds, held-out reals, feature spaces and timestep spacing),
so that its FDs divide the summaries' fairly. One row in RunLayout.teacher_summary (teacher_quality.csv),
read back by a rerun while it was measured at the same steps on the same stage-1 step, and by the headline
(trainer/quality/report_headline.py: the demo's last lines and report.html's first table)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from trainer.files import atomic, timing
from trainer.files.layout import RunLayout
from trainer.files.read import read_csv_rows
from trainer.quality import SUMMARY_FIELDS

# its DDIM steps, the stage-1 step it was measured at, then the summary's quality columns (no D scores it)
TEACHER_FIELDS = [
    "steps",
    "stage1_step",
    *(f for f in SUMMARY_FIELDS if f not in ("iteration", "d_acc", "d_prob_fake")),
]


def teacher_row(run_cfg, accelerator, steps: int, also=()) -> dict:
    """Measure the teacher of the stage-2 run `run_cfg` (its resolved config) at `steps`, or read its row
    back; write it into the run's folder and each folder of `also` (the demo's one-step companion: the same
    teacher on the same metric samples) where it is not there yet. A collective: every rank calls it; the
    main process writes. Returns the row."""
    from accelerate.utils import broadcast_object_list

    from trainer.stage2 import setup

    # the run's own config but for the step count: every metric setting stays the summary's (a recipe of
    # the run's K included); stage 2's checks and a read-only setup, as advdiff evaluate runs them
    cfg = dataclasses.replace(run_cfg, stage2=dataclasses.replace(run_cfg.stage2, generation_steps=steps))
    s = setup(cfg, accelerator, read_only=True)
    kept = [read_teacher_row(s.layout.teacher_summary) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(kept, from_process=0)  # every rank takes the main process's decision
    row = kept[0]
    if current(row, steps, s.stage1.step):
        s.log(f"teacher at {steps} steps: {s.layout.teacher_summary} already there; reusing it")
    else:
        with timing.phase(accelerator, s.layout.timings, "teacher row"):
            measured = s.evaluator().measure(0, s.stage1.new_unet(s.stage1.weights), None)
        row = {"steps": steps, "stage1_step": s.stage1.step, **measured}
        row = {k: row.get(k) for k in TEACHER_FIELDS}
        fds = " ".join(f"{k}={row[k]:.4g}" for k in ("latent_fd", "cls_fd") if not _missing(row[k]))
        s.log(f"teacher at {steps} steps (stage 1, EMA weights, step {s.stage1.step}): {fds}")
    if accelerator.is_main_process:
        for folder in (s.layout.root, *also):
            path = RunLayout(Path(folder), s.layout.name).teacher_summary
            if not current(read_teacher_row(path), steps, s.stage1.step):
                clean = {
                    k: None if _missing(v) else v for k, v in row.items()
                }  # empty cells, as the summary's
                atomic.write_csv([clean], path, TEACHER_FIELDS)
                s.log(f"teacher row written to {path}")
    accelerator.wait_for_everyone()
    return row


def current(row: dict | None, steps: int, stage1_step: int) -> bool:
    """Whether a teacher row read back was measured at these steps on this stage-1 step."""
    return row is not None and row.get("steps") == steps and row.get("stage1_step") == stage1_step


def read_teacher_row(path: Path) -> dict | None:
    """The row of a teacher_quality.csv (steps and stage1_step as ints), or None: missing, torn or foreign."""
    rows = read_csv_rows(path)
    if len(rows) != 1 or any(_missing(rows[0].get(k)) for k in ("steps", "stage1_step")):
        return None
    return {**rows[0], "steps": int(rows[0]["steps"]), "stage1_step": int(rows[0]["stage1_step"])}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
