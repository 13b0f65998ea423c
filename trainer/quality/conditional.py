"""Class-conditional sample quality, computed sharded across processes (every function that takes feature
rows is a collective: each rank passes its own rows and their class indices, and the sums are all-reduced,
never gathered, so the results do not depend on how the rows are split).

- class FD: the Fréchet distance of each class's fakes to the same class's reals, in one feature space
  (the summary uses the classifier's), averaged over the classes. A class with fewer than
  MIN_PER_CLASS rows in either set has no covariance to compare and is skipped; when every class is
  skipped the mean is NaN.
- label fidelity: the fraction of fakes a classifier puts in the class they were generated for (the
  argmax of its logits; ties go to the lowest class).
"""

from __future__ import annotations

import math

import torch

from trainer.parallel.collectives import Totals, all_reduce_sum
from trainer.quality.metrics import Moments, fd_from_moments

MIN_PER_CLASS = 2  # rows of a class needed in both sets for its FD (a covariance needs n - 1 >= 1)


class ClassMoments:
    """Per-class running count (C,), sum (C, D) and outer-product sum (C, D, D) of feature rows, float64."""

    def __init__(self, num_classes: int, dim: int, device="cpu"):
        self.n = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.s = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.ss = torch.zeros(num_classes, dim, dim, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor, labels: torch.Tensor) -> "ClassMoments":
        """rows (N, D) of classes labels (N,), integers in [0, C)."""
        x = rows.to(self.s.device, torch.float64)
        y = torch.as_tensor(labels, device=self.s.device).long().reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n.shape[0]):
            raise ValueError(f"class indices must lie in [0, {self.n.shape[0]}), got {y.min()}..{y.max()}")
        self.n.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.s.index_add_(0, y, x)
        self.ss.index_add_(0, y, x[:, :, None] * x[:, None, :])
        return self

    def reduced(self) -> "ClassMoments":
        """Summed over ranks in one collective (call on every rank)."""
        c, d = self.s.shape
        packed = all_reduce_sum(torch.cat([self.n, self.s.flatten(), self.ss.flatten()]))
        out = ClassMoments(c, d, self.s.device)
        out.n = packed[:c]
        out.s = packed[c : c + c * d].reshape(c, d)
        out.ss = packed[c + c * d :].reshape(c, d, d)
        return out

    def of(self, c: int) -> Moments:
        """Class c's moments."""
        m = Moments(self.s.shape[1], self.s.device)
        m.n, m.s, m.ss = self.n[c].clone(), self.s[c].clone(), self.ss[c].clone()
        return m


def class_fds(real: ClassMoments, fake: ClassMoments, min_count: int = MIN_PER_CLASS) -> dict[int, float]:
    """{class: FD of its fakes to its reals} for every class with >= min_count rows in both (reduced)
    moment sets; no collective."""
    out = {}
    for c in range(real.n.shape[0]):
        if real.n[c] >= min_count and fake.n[c] >= min_count:
            out[c] = fd_from_moments(real.of(c), fake.of(c))
    return out


def mean_class_fd(fds: dict[int, float]) -> float:
    """The mean of class_fds' values; NaN when no class had enough rows."""
    return sum(fds.values()) / len(fds) if fds else math.nan


def class_fd(
    real_rows: torch.Tensor,
    real_labels: torch.Tensor,
    fake_rows: torch.Tensor,
    fake_labels: torch.Tensor,
    num_classes: int,
    min_count: int = MIN_PER_CLASS,
) -> tuple[float, dict[int, float]]:
    """(mean over classes of the per-class FD, {class: FD}) of this rank's real and fake feature rows and
    their class indices (a collective: every rank calls it with its own rows, possibly none)."""
    dim = real_rows.shape[1]
    real = ClassMoments(num_classes, dim, real_rows.device).add(real_rows, real_labels).reduced()
    fake = ClassMoments(num_classes, dim, real_rows.device).add(fake_rows, fake_labels).reduced()
    fds = class_fds(real, fake, min_count)
    return mean_class_fd(fds), fds


def label_fidelity(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose argmax logit is their label, over every rank's rows (a collective);
    NaN when no rank has a row."""
    labels = torch.as_tensor(labels, device=logits.device).long().reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows but {labels.shape[0]} labels")
    sums = Totals(["correct", "rows"], logits.device)
    if logits.shape[0]:
        sums.add("correct", (logits.argmax(dim=1) == labels).sum().double())
    sums.add("rows", float(labels.shape[0]))
    s = sums.reduced()
    return s["correct"] / s["rows"] if s["rows"] else math.nan


def integer_class_names(class_names, classifier_classes: int) -> bool:
    """Whether a classifier trained on integer labels 0..K-1 scores this model's classes: its names are
    "0".."C-1" (class i is label i) and C <= K."""
    names = [str(n) for n in class_names]
    return names == [str(i) for i in range(len(names))] and len(names) <= classifier_classes
