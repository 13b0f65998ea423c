"""stage2.train_steps: one fine-tune trains a student for several step counts. Each training rollout batch
(the generator's, each fake-score update's) draws its K from the list, from its seed parts alone, so every
rank draws alike (2 processes against 1: tests/e2e/test_two_processes.py runs with train_steps); the
fakes, validation and the summary stay at generation_steps; the comparison picture shows every trained K.
"""

from types import SimpleNamespace

import pytest
import yaml
from helpers import finetune_alone
from test_distribution_matching import _config, _latest

from trainer.core.errors import UserError
from trainer.files.layout import comparison_panels
from trainer.stage2.rollouts import Rollouts


def _cfg(train_steps, k=4):
    return SimpleNamespace(stage2=SimpleNamespace(train_steps=train_steps, generation_steps=k))


def test_each_batch_draws_its_step_count_from_the_list():
    r = Rollouts(SimpleNamespace(), _cfg([1, 4]), SimpleNamespace(ddim=lambda: None), (4, 8, 8))
    draws = [r.steps_for((42, "stage2_g0", "rollout", step)) for step in range(60)]
    assert set(draws) == {1, 4} and min(draws.count(1), draws.count(4)) >= 15
    assert draws == [r.steps_for((42, "stage2_g0", "rollout", step)) for step in range(60)]  # deterministic
    r.cfg = _cfg(None)
    assert {r.steps_for((42, "stage2_g0", "rollout", step)) for step in range(10)} == {4}


def test_a_fine_tune_trains_at_every_listed_step_count_and_validates_at_generation_steps(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    trainer = finetune_alone(_config(tmp_path, digits_manifest, small_ae, stage1_ckpt, train_steps=[1, 2]))
    seen = {"train": [], "validation": []}
    start = trainer.rollouts.start

    def spy(model, idx, parts, steps=None, backsim=False):
        which = "validation" if "gval-rollout" in parts else "train"
        seen[which].append(steps or trainer.cfg.stage2.generation_steps)
        return start(model, idx, parts, steps, backsim)

    trainer.rollouts.start = spy
    trainer.fit()
    # 3 generator steps with 2 fake-score updates each: 9 training batches, at both step counts
    assert len(seen["train"]) == 9 and set(seen["train"]) == {1, 2}, seen
    assert seen["validation"] and set(seen["validation"]) == {2}
    assert _latest(tmp_path / "out")["state"]["fingerprint"]["train_steps"] == [1, 2]


def test_x0_pred_has_no_rollouts_to_sample_at_other_step_counts(tmp_path):
    """A config rule (trainer/config/sections.py), checked as the config loads."""
    from trainer.config.load import load_config

    s2 = {"generation_steps": 4, "train_steps": [1, 4], "generator_loss_mode": "x0_pred"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage2": s2}))
    with pytest.raises(UserError, match=r"^.*c\.yaml: stage2\.train_steps: expected null when .*x0_pred"):
        load_config(path)
    path.write_text(yaml.safe_dump({"stage2": {**s2, "generator_loss_mode": "rollout"}}))
    assert load_config(path).stage2.train_steps == [1, 4]


def test_the_comparison_shows_every_trained_step_count():
    assert comparison_panels({"generation_steps": 4, "train_steps": [4, 1]}, 25) == [
        ("stage 1", 4),
        ("stage 2", 1),
        ("stage 2", 4),
        ("stage 1", 25),
    ]
    assert comparison_panels({"generation_steps": 4}, 25) == [("stage 1", 4), ("stage 2", 4), ("stage 1", 25)]
