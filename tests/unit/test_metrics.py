"""Fréchet distance against closed forms, k-NN precision/recall on constructed cases, and the same
numbers (classifier-feature FD and its bootstrap interval too) at 1 and 2 processes."""

import pytest
import torch

from trainer.quality.metrics import Moments, fd_from_moments, features, frechet_distance, precision_recall


def test_fd_matches_closed_form_for_diagonal_gaussians():
    f64 = dict(dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], **f64), torch.tensor([1.0, 1.0, 0.0], **f64)
    v1, v2 = torch.tensor([1.0, 4.0, 0.25], **f64), torch.tensor([2.0, 1.0, 1.0], **f64)
    closed = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(closed, rel=1e-9)


def test_fd_matches_closed_form_for_rotated_gaussians():
    # same eigenbasis (commuting covariances): FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    a, b = (
        torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
        torch.tensor([4.0, 1.0, 1.0, 9.0], dtype=torch.float64),
    )
    c1, c2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    closed = float(((a.sqrt() - b.sqrt()) ** 2).sum()) + 2.0
    mu2 = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(torch.zeros(4), c1, mu2, c2) == pytest.approx(closed, rel=1e-9)


def test_fd_of_samples_converges_and_is_zero_for_identical_sets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 3, generator=g)
    y = torch.randn(20000, 3, generator=g) * 2 + 1
    est = fd_from_moments(Moments(3).add(x), Moments(3).add(y))
    closed = 3 * 1.0 + 3 * (1 + 4 - 2 * 2)  # |mu|^2 = 3, per dim 1 + 4 - 2*sqrt(4)
    assert est == pytest.approx(closed, rel=0.05)
    assert abs(fd_from_moments(Moments(3).add(x), Moments(3).add(x))) < 1e-8


def test_moments_accumulate_in_pieces():
    x = torch.randn(100, 5)
    whole = Moments(5).add(x)
    parts = Moments(5).add(x[:37]).add(x[37:])
    for a, b in zip(whole.mean_cov(), parts.mean_cov(), strict=False):
        assert torch.allclose(a, b)
    assert torch.allclose(whole.mean_cov()[1], torch.cov(x.T.double()))


def test_features_pool_when_too_large():
    assert features(torch.randn(2, 4, 8, 8)).shape == (2, 256)
    assert features(torch.randn(2, 16, 32, 32)).shape == (2, 16 * 8 * 8)


def test_precision_recall_constructed_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 2, generator=g)
    p, r = precision_recall(real, real.clone(), 200, 200)
    assert p == 1.0 and r == 1.0
    far = real + 100.0
    p, r = precision_recall(real, far, 200, 200)
    assert p == 0.0 and r == 0.0
    # reals in two clusters, fakes in only one: precise but half the recall
    two = torch.cat([torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g) + 50])
    one = torch.randn(200, 2, generator=g)
    p, r = precision_recall(two, one, 200, 200)
    assert p > 0.9 and 0.4 < r < 0.6


SCRIPT = """
import json, sys, torch
from models.classifier import ImageClassifier
from trainer.parallel.accelerator import build_accelerator
from trainer.parallel.collectives import gather_shards, shard_range
from trainer.quality.metrics import Moments, bootstrap_fd, fd_from_moments, precision_recall
acc = build_accelerator("cpu")
g = torch.Generator().manual_seed(3)
real, fake = torch.randn(37, 6, generator=g), torch.randn(41, 6, generator=g) * 1.5 + 0.3
rank, world = acc.process_index, acc.num_processes
r, f = shard_range(37, rank, world), shard_range(41, rank, world)
fd = fd_from_moments(
    Moments(6).add(real[r.start:r.stop]).reduced(), Moments(6).add(fake[f.start:f.stop]).reduced()
)
p, rc = precision_recall(real[r.start:r.stop], fake[f.start:f.stop], 37, 41)
# the classifier feature space (stage2.metric_features): each rank featurizes its own images
torch.manual_seed(0)
clf = ImageClassifier().eval()
images_r = torch.rand(37, 1, 32, 32, generator=g) * 2 - 1
images_f = torch.rand(41, 1, 32, 32, generator=g) * 2 - 1
with torch.no_grad():
    cr, cf = clf.features(images_r[r.start:r.stop]), clf.features(images_f[f.start:f.stop])
ref = Moments(64).add(cr).reduced()
cls_fd = fd_from_moments(ref, Moments(64).add(cf).reduced())
fake_all = gather_shards(cf, 41, to_all=False)
if acc.is_main_process:
    lo, hi = bootstrap_fd(ref, fake_all, 50, 7, point=cls_fd)
    json.dump({"fd": fd, "p": p, "r": rc, "cls_fd": cls_fd, "lo": lo, "hi": hi}, open(sys.argv[1], "w"))
acc.end_training()  # leaving a live gloo group to the interpreter's exit can abort (SIGABRT)
"""
