"""The loss-term types a config may name in `training.loss.losses[i].type`, with the step outputs each may
read. The config is a lower layer than training: trainer.training.losses.register_term implements a term and
names it here through `accept_loss_type`, so a registered type is accepted with no change to the config.

The built-in types are named here as well, so that a config validates without the training layer loaded
(training registers the same declarations; a mismatch fails at import)."""

from __future__ import annotations

from dataclasses import dataclass

# The keys of a fine-tune step's outputs (trainer.training.losses documents them).
OUTPUT_KEYS = ("pred_noise", "noise", "pred_latent", "latent", "model_output", "model_target")
GENERATED_KEYS = ("latent", "pred_latent")  # what names the generator's own sample, which D scores


@dataclass(frozen=True)
class LossType:
    keys: tuple[str, ...]  # what a term's `key` may name
    targets: tuple[str, ...] | None  # what its `target` may name; None: the term reads no target
    part: str | None = None  # the logged part it adds to (history columns train_<part>, val_<part>)


LOSS_TYPES: dict[str, LossType] = {}


def accept_loss_type(name: str, keys, targets=None, part: str | None = None) -> None:
    """Accept `name` in configs, its `key` one of `keys` and its `target` one of `targets` (None: any);
    `part`: the logged part its values go to (val_<part> may then pick the best checkpoint)."""
    rule = LossType(tuple(keys), None if targets is None else tuple(targets), part)
    if LOSS_TYPES.get(name, rule) != rule:
        raise ValueError(f"loss type {name!r} is already accepted with other keys: {LOSS_TYPES[name]}")
    LOSS_TYPES[name] = rule


# the parts every fine-tune logs, with or without a weighted term of their type
STANDARD_PARTS = ("mse", "adv")


class BestMetrics:
    """stage2.best_metric's choices: val_loss, val_<part> of every accepted loss type, val_latent_fd (read
    when the config validates, so a registered type's part is a choice at once)."""

    def names(self) -> list[str]:
        parts = dict.fromkeys([*STANDARD_PARTS, *(t.part for t in LOSS_TYPES.values() if t.part)])
        return ["val_loss", *(f"val_{p}" for p in parts), "val_latent_fd"]

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __len__(self) -> int:
        return len(self.names())


BEST_METRICS = BestMetrics()


def logged_parts(losses) -> list[str]:
    """The parts a fine-tune with these training.loss.losses logs: the standard ones and its terms'."""
    parts = [LOSS_TYPES[t.type].part for t in losses if t.type in LOSS_TYPES]
    return list(dict.fromkeys([*STANDARD_PARTS, *(p for p in parts if p)]))


# The fine-tune picture's panels after its standard four (loss, MSE, adversarial, D on samples), each drawn
# when the history has one of its columns: the named panels below, then one per logged part without one
# (a registered term's train_<part> and val_<part>). A term or helper with columns of its own names its
# panel through `accept_panel`; trainer/files/plots.py draws what metric_panels() lists.
METRIC_PANELS: dict[str, list[str]] = {}


def accept_panel(title: str, columns) -> None:
    """Draw `columns` of the fine-tune history together, in the panel titled `title`."""
    cols = METRIC_PANELS.setdefault(title, [])
    cols += [c for c in columns if c not in cols]


def metric_panels() -> list[tuple[str, list[str]]]:
    panels = {title: list(cols) for title, cols in METRIC_PANELS.items()}
    drawn = {c for cols in panels.values() for c in cols}
    for t in LOSS_TYPES.values():
        if t.part and t.part not in STANDARD_PARTS and f"train_{t.part}" not in drawn:
            panels.setdefault(t.part, [f"train_{t.part}", f"val_{t.part}"])
    return list(panels.items())


accept_loss_type("MSELoss", OUTPUT_KEYS, OUTPUT_KEYS, "mse")
accept_loss_type("DiscriminatorLoss", GENERATED_KEYS, part="adv")
accept_loss_type("DistributionMatchingLoss", ("latent",), part="dm")
# the DM term's part and its fake score's loss; the feature head (discriminator.config.type unet_features),
# trained in the fake score's updates, logs its own D columns
accept_panel("distribution matching", ["train_dm", "val_dm", "train_fake_loss"])
accept_panel("feature D", ["train_d_loss", "train_d_acc"])
