"""Class labels of a manifest (`dataset.label_column`): reading and checking them, the class names a model
records, and the label draws of generation (exact class frequencies, the same at any world size).

Class names: when every label is a non-negative integer (7, "7", 7.0), the class of a label is that integer
and the names are "0", "1", ..., so digit labels keep their meaning; otherwise the names are the sorted
distinct labels (as text), e.g. an image folder's sub-folder names. A model records its names; data read
for it later is mapped through them, and a label it does not know is one line naming the row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer.core.errors import UserError
from trainer.core.seeds import derive_seed, generator


def _integer(v) -> int | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) and f >= 0 else None


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def check_present(values, where: str) -> None:
    """Refuse an empty label: one line naming the row (after dataset.filters)."""
    for i, v in enumerate(values):
        if _missing(v):
            raise UserError(f"{where}: row {i}: no label (every row needs one for a class-conditional model)")


def class_names_of(values) -> list[str]:
    """The class names labelled data defines (see the module doc)."""
    values = list(values)
    ints = [_integer(v) for v in values]
    if values and all(i is not None for i in ints):
        return [str(i) for i in range(max(ints) + 1)]
    return sorted({str(v).strip() for v in values})


def label_indices(values, names: list[str], where: str) -> np.ndarray:
    """Class indices of labels under the class names `names`; an unknown label is one line naming the row
    and the classes."""
    check_present(values, where)
    by_name = {n: i for i, n in enumerate(names)}
    integer_names = names == [str(i) for i in range(len(names))]
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        key = str(_integer(v)) if integer_names and _integer(v) is not None else str(v).strip()
        if key not in by_name:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise UserError(
                f"{where}: row {i}: label {v!r} is not one of the model's {len(names)} classes ({shown})"
            )
        out[i] = by_name[key]
    return out


def class_counts(indices: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(indices, dtype=np.int64), minlength=num_classes)[:num_classes]


def apportion(n: int, counts) -> np.ndarray:
    """n split over classes in proportion to `counts` (largest remainders, ties to the lower class): the
    class frequencies of n draws, exactly."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("no labelled rows to take class frequencies from")
    share = counts / counts.sum() * n
    whole = np.floor(share).astype(np.int64)
    rest = n - int(whole.sum())
    order = sorted(range(len(counts)), key=lambda c: (-(share[c] - whole[c]), c))
    whole[order[:rest]] += 1
    return whole


def draw_labels(n: int, counts, *seed_parts) -> torch.Tensor:
    """n labels with the class frequencies of `counts` exactly (apportion), in an order shuffled from
    `seed_parts`: every rank computes the same n labels, whatever the world size."""
    labels = np.repeat(np.arange(len(counts)), apportion(n, counts))
    perm = np.random.default_rng(derive_seed(*seed_parts, "labels")).permutation(n)
    return torch.from_numpy(labels[perm])


def per_sample_labels(indices, counts, *seed_parts) -> torch.Tensor:
    """A label for each global sample index, drawn from the class frequencies of `counts`; sample i's label
    depends only on (seed_parts, i) (the training rollouts: any world size, any batch split)."""
    p = torch.as_tensor(np.asarray(counts, dtype=np.float64) / float(np.sum(counts)))
    return torch.tensor(
        [int(torch.multinomial(p, 1, generator=generator(*seed_parts, "label", int(i)))) for i in indices],
        dtype=torch.long,
    )


def dropped_labels(labels: torch.Tensor, indices, p: float, null_class: int, *seed_parts) -> torch.Tensor:
    """`labels` with each one replaced by the null class with probability p (classifier-free guidance's
    label dropout); sample i's coin depends only on (seed_parts, i)."""
    if p <= 0:
        return labels
    coins = torch.tensor(
        [float(torch.rand((), generator=generator(*seed_parts, "drop", int(i)))) for i in indices]
    )
    return torch.where(coins.to(labels.device) < p, torch.full_like(labels, null_class), labels)
