"""A new generator-loss term type is one class and one `register_term` call. Registered here only (no other
change to the project), it is accepted by the config, summed into a real fine-tune's loss, measured in its
validation and logged in its history. The composite's own state (the adapted weights) round-trips, and
resume states written before it had one (`adv_weights`) still load."""

import csv

import pytest
import torch
from helpers import finetune_alone, stage2_config

from trainer.config.load import load_config
from trainer.config.loss_types import LOSS_TYPES
from trainer.core.errors import ConfigError
from trainer.training.composite import CompositeLoss
from trainer.training.losses import REGISTRY, DiscriminatorLoss, MSELoss, Term, register_term


class MAELoss(Term):
    """Mean absolute error between two step outputs: an anchor term with a part of its own."""

    part = "mae"

    def per_sample(self, outputs, ctx):
        self.seen = outputs  # what the step gave it, for the hand computation below
        return (outputs[self.key].float() - outputs[self.target].float()).abs().flatten(1).mean(1)


@pytest.fixture
def mae():
    """MAELoss registered for one test: the registries are restored after it, so no other test sees it."""
    registry, accepted = dict(REGISTRY), dict(LOSS_TYPES)
    register_term(MAELoss)
    yield MAELoss
    REGISTRY.clear()
    REGISTRY.update(registry)
    LOSS_TYPES.clear()
    LOSS_TYPES.update(accepted)


BASE = [
    {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 1.0},
    {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.1},
]
MAE = {"type": "MAELoss", "key": "pred_latent", "target": "latent", "weight": 0.5}


def _trainer(root, manifest, ae, ckpt, loss, stage2=None):
    """A FinetuneTrainer of a tiny stage-2 config on 24 random latents with a fresh D (seeded alike)."""
    return finetune_alone(stage2_config(root, manifest, ae, ckpt, loss=loss, stage2=stage2))


def test_a_registered_term_joins_loss_validation_and_history(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, mae
):
    plain = _trainer(tmp_path / "plain", digits_manifest, small_ae, stage1_ckpt, BASE)
    plus = _trainer(tmp_path / "plus", digits_manifest, small_ae, stage1_ckpt, [*BASE, MAE])
    assert [type(t) for t in plus.loss.terms] == [MSELoss, DiscriminatorLoss, MAELoss]

    # the step: the same draws, so the total grows by exactly the new term's weighted value
    loss_a, parts_a, _ = plain.compute_loss(0)
    loss_b, parts_b, _ = plus.compute_loss(0)
    seen = plus.loss.terms[2].seen
    by_hand = float(torch.mean((seen["pred_latent"] - seen["latent"]).abs()).detach())
    assert parts_b["mae"] == pytest.approx(by_hand, rel=1e-6) and by_hand > 0
    assert parts_b["mse"] == parts_a["mse"] and parts_b["adv"] == parts_a["adv"]
    assert "mae" not in parts_a
    assert float(loss_b.detach()) == pytest.approx(float(loss_a.detach()) + 0.5 * by_hand, rel=1e-6)

    # validation: its own column, and its weighted share of val_loss
    row_a, row_b = plain.evaluate(), plus.evaluate()
    assert row_b["val_mae"] > 0 and "val_mae" not in row_a
    assert row_b["val_mse"] == row_a["val_mse"] and row_b["val_adv"] == row_a["val_adv"]
    assert row_b["val_loss"] == pytest.approx(row_a["val_loss"] + 0.5 * row_b["val_mae"], rel=1e-9)

    # a whole (tiny) fine-tune: the history CSV has its columns, after the built-in parts', with values
    plus.fit()
    with open(plus.history_path) as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[:9] == [
        "epoch",
        "step",
        "train_loss",
        "train_mse",
        "train_adv",
        "train_mae",
        "val_loss",
        "val_mse",
        "val_adv",
    ]
    assert header[9] == "val_mae"
    assert len(rows) == 2 and all(float(r["train_mae"]) > 0 and float(r["val_mae"]) > 0 for r in rows)


def test_the_config_accepts_registered_names_only(tmp_path, digits_manifest, small_ae, stage1_ckpt, mae):
    ok = stage2_config(tmp_path / "ok", digits_manifest, small_ae, stage1_ckpt, loss=[*BASE, MAE])
    assert [t.type for t in load_config(ok).training.loss.losses] == [
        "MSELoss",
        "DiscriminatorLoss",
        "MAELoss",
    ]
    bad = stage2_config(
        tmp_path / "bad", digits_manifest, small_ae, stage1_ckpt, loss=[*BASE, {**MAE, "type": "L3Loss"}]
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == (
        f"{bad}: training.loss.losses[2].type: expected one of MSELoss, DiscriminatorLoss, "
        "DistributionMatchingLoss, MAELoss, "
        f'got "L3Loss"'
    )
    key = stage2_config(
        tmp_path / "key", digits_manifest, small_ae, stage1_ckpt, loss=[*BASE, {**MAE, "target": "nothing"}]
    )
    with pytest.raises(ConfigError, match=r"training\.loss\.losses\[2\]\.target: expected one of pred_noise"):
        load_config(key)


def test_the_registries_agree_and_refuse_a_changed_declaration():
    assert list(REGISTRY) == list(LOSS_TYPES) == ["MSELoss", "DiscriminatorLoss", "DistributionMatchingLoss"]
    for name, kind in REGISTRY.items():
        assert (LOSS_TYPES[name].keys, LOSS_TYPES[name].targets) == (kind.keys, kind.targets)

    class MSELoss(Term):  # the same name with other keys
        keys = ("noise",)

    with pytest.raises(ValueError, match="already accepted with other keys"):
        register_term(MSELoss)
    assert REGISTRY["MSELoss"] is not MSELoss


def _composite(adv=0.25, **kw):
    return CompositeLoss(
        [
            MSELoss(key="a", target="b", weight=1.0),
            MAELoss(key="a", target="b", weight=0.0),  # dropped, but its part is logged
            DiscriminatorLoss(key="latent", target=None, weight=adv),
        ],
        **kw,
    )


def test_the_adaptive_weight_moves_the_adversarial_terms_and_round_trips():
    loss = _composite(adaptive=((0.5, 0.7), 2.0))
    assert loss.columns("train") == ["train_mse", "train_adv", "train_mae"]
    loss.adapt(0.9)  # D wins: push harder
    loss.adapt(float("nan"))  # no accuracy: no change
    assert [t.weight for t in loss.terms] == [1.0, 0.5] and loss.adversarial_weight == 0.5
    loss.adapt(0.1)
    loss.adapt(0.1)
    assert [t.weight for t in loss.terms] == [1.0, 0.125]
    state = loss.state_dict()
    fresh = _composite(adaptive=((0.5, 0.7), 2.0))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state == {"weights": [1.0, 0.125]}
    still = _composite()  # without the adaptive weight nothing moves
    still.adapt(0.9)
    assert still.adversarial_weight == 0.25


def test_a_state_from_before_the_composite_kept_its_own_loads(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    old = {"optimizer": None, "adv_weights": [1.0, 0.8]}  # the fine-tune's model state, as written before
    loss = _composite()
    loss.load_state_dict(old)
    assert [t.weight for t in loss.terms] == [1.0, 0.8]
    # through the trainer's resume: a state written the old way
    trainer = _trainer(tmp_path / "a", digits_manifest, small_ae, stage1_ckpt, BASE)
    state = trainer.model_state()
    assert state["loss"] == {"weights": [1.0, 0.1]}
    del state["loss"]
    state["adv_weights"] = [1.0, 0.4]
    again = _trainer(tmp_path / "b", digits_manifest, small_ae, stage1_ckpt, BASE)
    again.load_model_state(state)
    assert [t.weight for t in again.loss.terms] == [1.0, 0.4]
