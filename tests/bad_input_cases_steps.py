"""The bad-input catalogue's cases of the generator step's settings (bad_input_cases.py imports them into
CASES): stage2.recipes (settings by step count), backward simulation and the fake score's reuse of the
generator's samples."""

from bad_input_cases import _set

__all__ = [
    "c_recipe_unknown_path",
    "c_recipe_not_a_mapping",
    "c_recipe_bad_value",
    "c_backward_simulation_grad_steps",
    "c_reuse_generator_samples_batch",
]


def c_recipe_unknown_path(c):
    p = c.config(_set("stage2.recipes", {1: {"stage2.learning_rat": 1.0e-4}}))
    return (
        ["--generation_steps", "1"],
        p,
        f"{p}: stage2.recipes.1: stage2.learning_rat: not a config field (docs/CONFIG.md lists them)",
        False,  # the recipe of generation_steps 1: validate reads the file's own step count
    )


def c_recipe_not_a_mapping(c):
    p = c.config(_set("stage2.recipes", {1: "fast"}))
    return [], p, f"{p}: stage2.recipes.1: expected a mapping of config paths to values", True


def c_recipe_bad_value(c):  # a recipe's value is checked like the field's own
    p = c.config(_set("stage2.recipes", {1: {"stage2.lr_schedule": "linear"}}))
    return (
        ["--generation_steps", "1"],
        p,
        f'{p}: stage2.lr_schedule: expected one of cosine, constant, cosine_run, got "linear"',
        False,
    )


def c_backward_simulation_grad_steps(c):
    p = c.config(_set("stage2.backward_simulation", True))
    return (
        ["--set", "stage2.rollout_grad_steps=2"],
        p,
        f"{p}: stage2.rollout_grad_steps: expected 1 when backward_simulation is true (its one UNet call "
        "keeps the gradient), got 2",
        False,
    )


def c_reuse_generator_samples_batch(c):
    def edit(d):
        d["stage2"]["distribution_matching"] = {"reuse_generator_samples": True, "batch_size": 3}

    p = c.config(edit)
    return (
        [],
        p,
        f"{p}: stage2.distribution_matching.batch_size: expected null when reuse_generator_samples is true "
        "(the reused batch is the generator's rollout batch, stage2.rollout_batch_size), got 3",
        True,
    )
