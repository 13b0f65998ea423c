"""The bad-input catalogue's sampler cases (bad_input_cases.py imports them into CASES): the DDIM step
counts of stage 2 and the scheduler's timestep spacing."""

from bad_input_cases import _set

__all__ = [
    "c_generation_steps",
    "c_train_steps_beyond",
    "c_train_steps_empty",
    "c_bad_timestep_spacing",
    "c_changed_timestep_spacing",
]


def c_generation_steps(c):
    p = c.config()
    return (
        ["--generation_steps", "5000"],
        p,
        f"{p}: stage2.generation_steps: expected at most 1000 (the stage-1 schedule's steps), got 5000",
        True,
    )


def c_train_steps_beyond(c):
    p = c.config()
    return (
        ["--set", "stage2.train_steps=[1, 5000]"],
        p,
        f"{p}: stage2.train_steps: expected step counts of at most 1000 (the stage-1 schedule's steps), "
        "got [1, 5000]",
        True,
    )


def c_train_steps_empty(c):
    p = c.config(_set("stage2.train_steps", []))
    return (
        [],
        p,
        f"{p}: stage2.train_steps: expected a non-empty list of integers >= 1 (or null), got []",
        True,
    )


def c_bad_timestep_spacing(c):
    p = c.config()
    expected = 'scheduler.timestep_spacing: expected one of leading, trailing, linspace, got "uniform"'
    return ["--set", "scheduler.timestep_spacing=uniform"], p, f"{p}: {expected}", True


def c_changed_timestep_spacing(c):
    p = c.config()  # the run sampled with its stage-1 model's own spacing: trailing (a new model's)
    changed = 'scheduler.timestep_spacing: "trailing" -> "leading"'
    return (
        ["--set", "scheduler.timestep_spacing=leading"],
        p,
        f"{c.out}: this folder's stage-2 run was started with a different config ({changed}); use a new "
        f"experiment.save_path, or restore those fields",
        True,
    )
