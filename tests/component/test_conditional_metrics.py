"""Class-conditional quality (trainer.quality.conditional): per-class FD against numpy, its skipped
classes and a shifted class, label fidelity on a hand-made classifier, and the conditional Evaluator:
sample i is drawn for held-out real i's class at the configured guidance scale, its class_fd /
label_fidelity / guidance_scale columns, the one-time log lines, and the same labels, samples and
metrics at 1 and 2 processes."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from trainer.quality.conditional import (
    MIN_PER_CLASS,
    ClassMoments,
    class_fd,
    class_fds,
    integer_class_names,
    label_fidelity,
    mean_class_fd,
)

D, COUNTS = 4, (30, 25, 40)


def _labelled(seed: int, counts=COUNTS, dim: int = D):
    """Feature rows of len(counts) classes (class c centred at c, its own scale), labels interleaved."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    rows = (
        torch.randn(len(labels), dim, generator=g, dtype=torch.float64) * (1 + labels[:, None])
        + labels[:, None]
    )
    return rows, labels


def _numpy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FD from numpy's covariances and the eigenvalues of C1 C2 (real, >= 0 for PSD C1, C2)."""
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.clip(np.linalg.eigvals(c1 @ c2).real, 0, None)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(eig).sum())


def test_class_fd_is_zero_for_identical_sets():
    rows, labels = _labelled(0)
    mean, fds = class_fd(rows, labels, rows.clone(), labels.clone(), 3)
    assert sorted(fds) == [0, 1, 2]
    assert all(abs(v) < 1e-9 for v in fds.values()) and abs(mean) < 1e-9


def test_class_fd_grows_with_one_shifted_class_only():
    rows, labels = _labelled(1)
    shifted = rows.clone()
    shifted[labels == 1] += 2.0  # the covariance is unchanged: FD = |dmu|^2 = 4 * D
    mean, fds = class_fd(rows, labels, shifted, labels, 3)
    assert fds[1] == pytest.approx(4.0 * D, rel=1e-9)
    assert abs(fds[0]) < 1e-9 and abs(fds[2]) < 1e-9
    assert mean == pytest.approx(4.0 * D / 3, rel=1e-9)
    # the classes' rows swapped (0 <-> 2): the whole set is unchanged, the per-class FD is large
    swapped = labels.clone()
    swapped[labels == 0], swapped[labels == 2] = 2, 0
    assert class_fd(rows, labels, rows, swapped, 3)[0] > 1.0


def test_class_fd_matches_numpy_per_class():
    real, real_labels = _labelled(2)
    fake, fake_labels = _labelled(3, counts=(20, 35, 28))
    fake = fake * 1.3 + 0.2
    mean, fds = class_fd(real, real_labels, fake, fake_labels, 3)
    direct = {c: _numpy_fd(real[real_labels == c].numpy(), fake[fake_labels == c].numpy()) for c in range(3)}
    for c in range(3):
        assert fds[c] == pytest.approx(direct[c], rel=1e-6), c
    assert mean == pytest.approx(sum(direct.values()) / 3, rel=1e-6)


def test_classes_with_too_few_rows_are_skipped():
    real, real_labels = _labelled(4, counts=(10, 1, 10, 0))  # class 1: one real, class 3: none
    fake, fake_labels = _labelled(5, counts=(10, 10, 1, 10))  # class 2: one fake
    assert MIN_PER_CLASS == 2
    mean, fds = class_fd(real, real_labels, fake, fake_labels, 4)
    assert sorted(fds) == [0]
    assert (
        mean
        == fds[0]
        == pytest.approx(_numpy_fd(real[real_labels == 0].numpy(), fake[fake_labels == 0].numpy()))
    )
    assert math.isnan(class_fd(real[:1], real_labels[:1], fake[:1], fake_labels[:1], 4)[0])
    assert math.isnan(mean_class_fd({}))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ClassMoments(3, D).add(fake, fake_labels)  # class 3 of a 3-class model
    with pytest.raises(ValueError, match="labels"):
        ClassMoments(4, D).add(real, real_labels[:-1])


def test_class_moments_of_two_shards_add_up_to_the_whole():
    rows, labels = _labelled(6)
    whole = ClassMoments(3, D).add(rows, labels)
    a, b = ClassMoments(3, D).add(rows[:41], labels[:41]), ClassMoments(3, D).add(rows[41:], labels[41:])
    for name in ("n", "s", "ss"):  # what all_reduce_sum does with two ranks' moments
        assert torch.allclose(getattr(a, name) + getattr(b, name), getattr(whole, name))
    real = ClassMoments(3, D).add(rows, labels)
    assert class_fds(whole, real) == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0}, abs=1e-9)
    m0 = whole.of(0)
    assert int(m0.n) == COUNTS[0]
    assert torch.allclose(m0.mean_cov()[1], torch.cov(rows[labels == 0].T))


def _hand_made_classifier(folder, k: int = 3):
    """An advdiff classifier file whose output layer is the identity on its first k features."""
    from models.classifier import ImageClassifier, classifier_export

    torch.manual_seed(0)
    model = ImageClassifier(num_classes=k, feature_dim=16)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.weight[:, :k] = torch.eye(k)
        model.out.bias.zero_()
    path = folder / "hand.pt"
    torch.save(classifier_export(model, val_acc=1.0), path)
    return path, model


def test_label_fidelity_is_the_fraction_correct_of_a_hand_made_classifier(tmp_path):
    from trainer.quality.feature_spaces import ClassifierFeatures

    path, model = _hand_made_classifier(tmp_path)
    space = ClassifierFeatures(path, "cpu")
    assert space.num_classes == 3
    # feature rows whose largest of the first 3 entries is known: class 0, 1, 2, 2, 0, 1, 1, 0, 2, 1
    winners = torch.tensor([0, 1, 2, 2, 0, 1, 1, 0, 2, 1])
    rows = torch.rand(10, 16, generator=torch.Generator().manual_seed(0))
    rows[torch.arange(10), winners] = 5.0
    logits = space.classify(rows)
    assert torch.equal(logits, rows[:, :3])
    labels = winners.clone()
    labels[[1, 4, 8]] = torch.tensor([0, 2, 1])  # 3 of 10 generated for another class
    assert label_fidelity(logits, labels) == pytest.approx(0.7)
    assert label_fidelity(logits, winners) == 1.0
    assert math.isnan(label_fidelity(logits[:0], labels[:0]))
    # logits of the space's own feature rows are the classifier's forward pass
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    assert torch.allclose(space.classify(space(images)), model(images), atol=1e-6)


def test_integer_class_names_decide_label_fidelity():
    assert integer_class_names(("0", "1", "2"), 3)
    assert integer_class_names(("0", "1"), 10)  # a classifier of more classes still names these
    assert not integer_class_names(("0", "1", "2"), 2)
    assert not integer_class_names(("cat", "dog"), 10)
    assert not integer_class_names(("1", "2"), 10)


# -- the Evaluator ---------------------------------------------------------------------------------------
CLASSES, SHAPE, SCALE = 10, (1, 8, 8), 2.0


class _ClassUNet(torch.nn.Module):
    """A stand-in class-conditional UNet (C classes + the null label C): its output is 0.1 x plus a fixed
    pattern per class, so a sample tells which class it was drawn for; elementwise, so batches don't
    matter."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Parameter(
            torch.randn(CLASSES + 1, *SHAPE, generator=torch.Generator().manual_seed(5))
        )

    def forward(self, x, t, class_labels=None):
        return SimpleNamespace(sample=0.1 * x + self.emb[class_labels])


def conditional_evaluator(folder, manifest, classifier=None, class_names=None, lines=None, scale=SCALE):
    """An Evaluator of a 10-class model over the digits: "latents" are 8x8 pooled digits, the decoder
    upsamples them (the measurement path of stage 2 without a real diffusion model or AE)."""
    from trainer.config.load import load_config
    from trainer.data.manifest import load_image, read_manifest
    from trainer.diffusion.conditioning import Conditioning
    from trainer.diffusion.schedule import Schedule
    from trainer.parallel.accelerator import build_accelerator
    from trainer.quality.evaluation import Evaluator

    folder.mkdir(parents=True, exist_ok=True)
    stage2 = {
        "metric_samples": 120,
        "metric_bootstrap": 0,
        "generation_steps": 2,
        "generation_batch_size": 16,
    }
    if classifier is not None:
        stage2["metric_features"] = f"classifier:{classifier}"
    (folder / "cfg.yaml").write_text(
        yaml.safe_dump(
            {
                "experiment": {"name": "cc", "save_path": "out"},
                "dataset": {"manifest": str(manifest)},
                "stage2": stage2,
            }
        )
    )
    cfg = load_config(folder / "cfg.yaml")
    cfg.stage2.guidance_scale = scale  # set here: the config's own checks may want a conditional model
    rows = read_manifest(manifest, "image_path", keep=("label",))
    rows["label_index"] = rows["label"].astype("int64")

    def encode(r):
        return F.avg_pool2d(torch.stack([load_image(p, 32, 1) for p in r["image_path"]]), 4)

    def decode(z):
        return F.interpolate(z, size=(16, 16), mode="bilinear", align_corners=False)

    names = class_names or tuple(str(i) for i in range(CLASSES))
    cond = Conditioning(CLASSES, names, CLASSES, 0.1)
    log = (lines if lines is not None else []).append
    ev = Evaluator(
        build_accelerator("cpu"), cfg, folder / "out" / "cc_summary.csv", rows, encode, decode,
        Schedule("linear", 1000), SHAPE, log, conditioning=cond,
    )  # fmt: skip
    return ev, rows


def _direct_samples(ev, labels):
    """All M samples drawn directly: noise i of the metric seeds, class labels[i], at SCALE."""
    from trainer.diffusion.noise import per_sample_noise
    from trainer.diffusion.sampling import ddim_sample

    noise = per_sample_noise(range(ev.m), SHAPE, ev.cfg.training.seed, "metric")
    ddim = ev.schedule.ddim()
    return ddim_sample(
        _ClassUNet(),
        ddim,
        noise,
        2,
        batch_size=7,
        class_labels=labels,
        guidance_scale=SCALE,
        null_class=CLASSES,
    )


def test_evaluator_draws_each_sample_for_its_reals_class(tmp_path, digits_manifest):
    path, _ = _hand_made_classifier(tmp_path, k=CLASSES)
    lines = []
    ev, rows = conditional_evaluator(tmp_path / "run", digits_manifest, path, lines=lines)
    truth = rows["label"].to_numpy()[ev.rows_pick].astype(np.int64)
    assert np.array_equal(ev.labels, truth) and ev.m == 120
    fakes = ev._fakes(_ClassUNet())
    assert torch.allclose(fakes, _direct_samples(ev, torch.from_numpy(truth)), atol=1e-6)
    other = torch.from_numpy((truth + 1) % CLASSES)  # the samples do depend on the class
    assert not torch.allclose(fakes, _direct_samples(ev, other), atol=1e-3)

    row = ev.measure(0, _ClassUNet(), None)
    assert row["guidance_scale"] == SCALE
    reals, feats = ev.real_features()["cls"], ev.space()(ev.decode(fakes))
    labels = torch.from_numpy(truth)
    assert row["class_fd"] == pytest.approx(class_fd(reals, labels, feats, labels, CLASSES)[0], rel=1e-6)
    images = F.interpolate(ev.decode(fakes).clamp(-1, 1), size=(32, 32), mode="bilinear", antialias=True)
    direct = (ev.space().model(images).argmax(1) == labels).double().mean().item()
    assert row["label_fidelity"] == pytest.approx(direct, abs=1e-9)

    ev._fakes = lambda unet: ev._reals()  # samples equal to the reals: every class's FD is 0
    same = ev.measure(1, _ClassUNet(), None)
    assert abs(same["class_fd"]) < 1e-6 * row["class_fd"]
    ev.record(same)
    from trainer.files.read import read_csv_rows

    (written,) = read_csv_rows(ev.path)
    assert written["guidance_scale"] == SCALE and "label_fidelity" in written and written["iteration"] == 1


def test_class_columns_need_a_classifier_and_integer_class_names(tmp_path, digits_manifest):
    lines = []
    ev, _ = conditional_evaluator(tmp_path / "raw", digits_manifest, lines=lines)
    ev._fakes = lambda unet: ev._reals()
    row = ev.measure(0, _ClassUNet(), None)
    assert row["guidance_scale"] == SCALE and "class_fd" not in row and "label_fidelity" not in row
    for scale, expected in ((None, 1.0), (0.0, 0.0)):  # null means 1; 0 is a scale (the null label alone)
        ev, _ = conditional_evaluator(tmp_path / f"s{scale}", digits_manifest, lines=lines, scale=scale)
        assert ev.measure(0, _ClassUNet(), None)["guidance_scale"] == expected

    path, _ = _hand_made_classifier(tmp_path, k=CLASSES)
    names = tuple("abcdefghij")
    ev, _ = conditional_evaluator(tmp_path / "named", digits_manifest, path, class_names=names, lines=lines)
    ev._fakes = lambda unet: ev._reals()
    rows = [ev.measure(k, _ClassUNet(), None) for k in (0, 1)]
    assert all("class_fd" in r and "label_fidelity" not in r for r in rows)
    told = [line for line in lines if line.startswith("label_fidelity")]
    assert len(told) == 1 and "0..9" in told[0], lines  # once per Evaluator


def test_conditional_evaluator_needs_label_index(tmp_path, digits_manifest):
    from trainer.quality.evaluation import Evaluator

    ev, rows = conditional_evaluator(tmp_path / "run", digits_manifest)
    with pytest.raises(ValueError, match="label_index"):
        Evaluator(
            ev.acc,
            ev.cfg,
            ev.path,
            rows.drop(columns="label_index"),
            None,
            None,
            None,
            SHAPE,
            print,
            conditioning=ev.conditioning,
        )


SCRIPT = """
import json, sys
sys.path.insert(0, "tests/component")
from pathlib import Path
from test_conditional_metrics import _ClassUNet, conditional_evaluator
from trainer.parallel.collectives import gather_shards
folder, manifest, classifier, out = map(Path, sys.argv[1:5])
ev, _ = conditional_evaluator(folder, manifest, classifier)
fakes = gather_shards(ev._fakes(_ClassUNet()), ev.m, to_all=False)
row = ev.measure(0, _ClassUNet(), None)
if ev.acc.is_main_process:
    row["labels"] = ev.labels.tolist()
    row["fakes"] = fakes.flatten(1).sum(1).tolist()
    json.dump(row, open(out, "w"))
ev.acc.end_training()
"""
