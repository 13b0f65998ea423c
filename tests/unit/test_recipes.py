"""stage2.recipes (trainer/config/recipes.py): settings by step count, applied over the file's own values
for the run's generation_steps, with flags and --set still winning; the embedded default's recipes."""

import pytest
import yaml

from trainer.config.load import DEMO_CONFIG, load_config
from trainer.core.errors import ConfigError

TERMS = [
    {"type": "DistributionMatchingLoss", "key": "latent", "target": None, "weight": 1.0},
    {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.5},
]


def _data(recipes, generation_steps=4):
    return {
        "stage2": {"generation_steps": generation_steps, "learning_rate": 1e-4, "recipes": recipes},
        "discriminator": {"config": {"type": "unet_features"}},
        "training": {"loss": {"type": "CompositeLoss", "losses": [dict(t) for t in TERMS]}},
    }


ONE = {"stage2.lr_schedule": "constant", "training.loss.losses[DiscriminatorLoss].weight": 0.05}


def test_the_recipe_of_the_runs_step_count_applies_and_only_it():
    four = load_config(data=_data({1: ONE}))
    assert four.stage2.lr_schedule is None and four.training.loss.losses[1].weight == 0.5
    one = load_config(data=_data({1: ONE}), overrides={"stage2.generation_steps": 1})
    assert one.stage2.lr_schedule == "constant"
    assert [t.weight for t in one.training.loss.losses] == [1.0, 0.05]  # the term named by type alone
    assert one.stage2.learning_rate == 1e-4  # what the recipe does not name stays the file's


def test_a_flag_or_set_beats_the_recipe():
    overrides = {"stage2.generation_steps": 1, "stage2.lr_schedule": "cosine"}
    cfg = load_config(data=_data({1: ONE}), overrides=overrides)
    assert cfg.stage2.lr_schedule == "cosine" and cfg.training.loss.losses[1].weight == 0.05
    # a flag that sets the loss list whole keeps the recipe off its terms' weights
    whole = {"stage2.generation_steps": 1, "training.loss.losses": [dict(t) for t in TERMS]}
    assert load_config(data=_data({1: ONE}), overrides=whole).training.loss.losses[1].weight == 0.5


@pytest.mark.parametrize(
    "recipes, message",
    [
        ({1: {"stage2.nope": 1}}, r"stage2\.recipes\.1: stage2\.nope: not a config field"),
        ({1: {"training.loss.losses[MSELoss].weight": 1.0}}, r"no losses item of type MSELoss"),
        ({0: {}}, r"stage2\.recipes: expected step counts >= 1 as keys, got 0"),
        ({1: [1]}, r"stage2\.recipes\.1: expected a mapping of config paths to values"),
        ([1], r"stage2\.recipes: expected a mapping of step counts to settings"),
        ({1: {"stage2.lr_schedule": "linear"}}, r"stage2\.lr_schedule: expected one of cosine"),
    ],
)
def test_bad_recipes_are_one_line(recipes, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(data=_data(recipes), overrides={"stage2.generation_steps": 1})
    assert "\n" not in str(e.value)


def test_the_embedded_default_has_a_recipe_for_each_step_count_it_runs():
    recipes = yaml.safe_load(DEMO_CONFIG.read_text())["stage2"]["recipes"]
    assert {int(k) for k in recipes} >= {1, 4}
    base = load_config(DEMO_CONFIG)
    assert base.stage2.generation_steps == 4
    one = load_config(DEMO_CONFIG, {"stage2.generation_steps": 1})
    for path, value in recipes[1].items():  # every setting of the one-step recipe reaches the config
        node = one
        for part in path.split("."):
            if part.endswith("]"):
                name, kind = part[:-1].split("[")
                node = next(x for x in getattr(node, name) if x.type == kind)
            else:
                node = getattr(node, part)
        assert node == value, path
