"""The fake score's warm start on the iteration's saved fakes (stage2.distribution_matching.warm_start_steps,
DistributionMatching.warm_start): it trains the fake score (and the feature head) on exactly those fakes,
deterministically, before the first generator step of a fine-tune that starts afresh, and a resumed
fine-tune does not redo it. 2 processes against 1 and kill -9 with it on: tests/e2e/test_two_processes.py
and tests/e2e/test_faults_dm.py."""

import pytest
import test_feature_discriminator as feat
import torch
from helpers import finetune_alone
from test_distribution_matching import DM, _config, _latest

from trainer.config.load import load_config
from trainer.core.errors import UserError
from trainer.training.loop import walk_rows

N = 24


def _fakes(shift=0.0):
    g = torch.Generator().manual_seed(7)
    return torch.randn(N, 4, 8, 8, generator=g) + shift


def _weights(trainer):
    """The fake score's weights, and its feature head's (prefixed) where it has one."""
    module = trainer.helper("distribution_matching").module  # the fake score, or the fake score with its head
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_walk_rows_visits_every_row_once_per_epoch_at_any_split():
    rows = [walk_rows(10, range(4), d, 4, 1, "x") for d in range(5)]  # 20 slots: two epochs of 10
    flat = torch.tensor([int(r) for rs in rows for r in rs])
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    halves = [walk_rows(10, s, 3, 4, 1, "x") for s in (range(0, 2), range(2, 4))]  # two ranks' slots
    assert list(halves[0]) + list(halves[1]) == list(rows[3])


def test_warm_start_trains_the_fake_score_and_head_on_the_saved_fakes(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    """With the feature discriminator (the fake score alone: the resume test below): the fake score and
    its head train in the same updates, the head on the reals against the fakes."""
    dm = {"n_fake": 2, "batch_size": 4, "warm_start_steps": 3}
    trainers = []
    for name in ("a", "b", "c"):
        path = feat._config(tmp_path / name, digits_manifest, small_ae, stage1_ckpt, distribution_matching=dm)
        trainers.append(feat._trainer(path))
    start = _weights(trainers[0])
    logs = trainers[0].helper("distribution_matching").warm_start(_fakes(), N, 42, "stage2_g0")
    assert set(logs) == {"first", "last"} and logs["last"]["fake_loss"] > 0
    assert 0 <= logs["last"]["d_acc"] <= 1 and logs["last"]["d_loss"] > 0
    trainers[1].helper("distribution_matching").warm_start(_fakes(), N, 42, "stage2_g0")
    trainers[2].helper("distribution_matching").warm_start(_fakes(shift=1.0), N, 42, "stage2_g0")
    a, b, c = (_weights(t) for t in trainers)
    assert not _same(start, a)  # it trained (the fake score and the head)
    assert _same(a, b)  # deterministic: the same fakes give the same fake score
    assert not _same(a, c)  # and it learnt from the fakes it was given


def test_the_fine_tune_warm_starts_once_and_a_resume_does_not_redo_it(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    dm = {"n_fake": 2, "batch_size": 4, "warm_start_steps": 2}
    calls = []

    def trainer(name):
        t = finetune_alone(
            _config(tmp_path / name, digits_manifest, small_ae, stage1_ckpt, distribution_matching=dm)
        )
        t.warm_fakes = (_fakes(), N, None)
        inner = t.helper("distribution_matching").warm_start
        t.helper("distribution_matching").warm_start = lambda *a: calls.append(name) or inner(*a)
        return t

    trainer("a").fit()
    first = trainer("b")
    first.stop_after = 1
    first.fit()
    trainer("b").fit()  # resumes at step 1: the fake score comes from the resume state
    assert calls == ["a", "b"]
    cold = finetune_alone(_config(tmp_path / "cold", digits_manifest, small_ae, stage1_ckpt))
    cold.fit()
    a, b, c = (_latest(tmp_path / x / "out") for x in ("a", "b", "cold"))
    fa, fb, fc = (x["state"]["model"]["distribution_matching"]["fake"] for x in (a, b, c))
    assert _same(fa, fb) and _same(a["raw_state_dict"], b["raw_state_dict"])
    assert not _same(fa, fc)  # the warm start made a difference
    assert a["state"]["fingerprint"]["distribution_matching"]["warm_start_steps"] == 2


def test_a_negative_warm_start_is_one_line(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    dm = {"warm_start_steps": -1}
    path = _config(tmp_path, digits_manifest, small_ae, stage1_ckpt, loss=(DM,), distribution_matching=dm)
    with pytest.raises(
        UserError,
        match=r"stage2\.distribution_matching\.warm_start_steps: expected an integer >= 0, got -1$",
    ):
        load_config(path)
