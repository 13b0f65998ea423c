"""The helper networks of the fine-tune, as components.

A helper is any network with its own state that lives beside the generator during the fine-tune: a critic
(critics.py: the offline latent D, the online D, the feature head on the fake score), or the network a loss
term brings (distribution matching's teacher and fake score). The fine-tune (finetune_trainer.py) holds a
list of them and only calls the hooks below, in list order, never asking what kind a helper is:

  build        the class method that makes it from a FinetuneContext (what the phase has)
  name         its key in the loss context (ctx[name] is the helper), the resume state and the logs
  columns      the history columns its pre-steps log (train_<key> for each key they return)
  fingerprint  the config fields that define its training (part of the phase's resume fingerprint)
  start        before the first generator step of a phase that starts afresh (a warm start)
  pre_step     its own updates before each generator step; returns the logs named by `columns`
  post_step    its updates after the generator step, on that step's own samples (detached); returns
               the logs named by `columns` (they replace the pre-step's)
  frozen       a context in which none of its parameters takes a gradient (the generator step)
  evaluating   a context for validation (eval mode where it trains)
  state / load_state   its part of the phase's resume state (None: it has none)
  export       its files at the end of the phase, written before the state that marks the phase complete

A loss term (trainer/training/losses.py) names the helper it needs in its `helper` class attribute; the
helper class is registered here under that name (`register_helper`). A new network with its own state is
one Helper subclass and one registration, and its term one Term subclass and one register_term call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from trainer.training.losses import REGISTRY

HELPERS: dict[str, type] = {}


@dataclass
class FinetuneContext:
    """What a helper is built from: the phase's Accelerator, config and iteration, the stage-1 model's
    facts (base: a DiffusionCheckpoint; its EMA weights are the teacher), the noise schedule, the latent
    shape, this rank's reals (own shard_range block) with the global train mask, a class-conditional run's
    RunLabels and the reals' classes, the iteration's starting weights (`init`: what an earlier iteration
    carried over, by helper name), the run layout, and the critic once it is built."""

    accelerator: object
    cfg: object
    k: int
    layout: object
    base: object
    schedule: object
    latent_shape: tuple
    real: object
    real_train: object
    labels: object = None
    real_labels: object = None
    init: dict = field(default_factory=dict)
    source: object = None  # the sample source (samples.py)
    critic: object = None


@dataclass
class StepInputs:
    """What a helper's pre-step reads: the generator as it stands (the plain module, no gradient is taken
    through it here), its sample source, the phase's seed and stage name, and `reals(n, draw)`: n of this
    rank's training reals (with their labels, or None) for the phase's draw-th draw."""

    model: object
    samples: object
    seed: int
    stage: str
    reals: object


@dataclass
class StepSample:
    """A micro-batch of the generator step's own samples: detached, their global indices and labels (a
    class-conditional run's, else None)."""

    sample: object
    index: list
    labels: object = None


def step_samples_of(generated: dict) -> list:
    """[the StepSample of a micro-batch's generated outputs] where they hold the generator's own sample
    (rollouts), else []."""
    if "generated_sample" not in generated:
        return []
    sample, index = generated["generated_sample"].detach(), generated["generated_index"]
    return [StepSample(sample, index, generated.get("generated_labels"))]


class Helper:
    """The hooks' defaults: a helper without state, steps, columns or files."""

    name = ""
    columns: list[str] = []
    state_key: str | None = None  # its key in the resume state (None: it has no resume state)

    @classmethod
    def fingerprint_of(cls, cfg) -> dict:
        """{key: fields} for the resume fingerprint; empty where nothing of its own defines the phase."""
        return {}

    @classmethod
    def carry(cls, cfg, layout, k: int):
        """(what iteration k starts from of iteration k-1's helper, its description), or None: nothing."""
        return None

    def start(self, run) -> None:
        pass

    def pre_step(self, step: int, inputs: StepInputs) -> dict:
        return {}

    def post_step(self, step: int, inputs: StepInputs, samples: list) -> dict:
        """samples: the generator step's samples on this rank, one StepSample per micro-batch."""
        return {}

    def frozen(self):
        return contextlib.nullcontext()

    def evaluating(self):
        return contextlib.nullcontext()

    def state(self, run) -> dict | None:
        return None

    def load_state(self, state: dict, run) -> None:
        pass

    def export(self, run) -> None:
        pass


def register_helper(name: str, cls: type) -> type:
    """Make `cls` (a Helper with a `build(ctx)` class method) the helper a loss term names by `name`."""
    HELPERS[name] = cls
    return cls


def term_helper_classes(cfg) -> list[type]:
    """The helper classes of training.loss's weighted terms, each once, in the terms' order."""
    out = []
    for term in cfg.training.loss.losses:
        name = REGISTRY[term.type].helper
        if term.weight > 0 and name is not None and HELPERS[name] not in out:
            out.append(HELPERS[name])
    return out


def frozen(helpers):
    """Every helper frozen at once (the generator step)."""
    stack = contextlib.ExitStack()
    for helper in helpers:
        stack.enter_context(helper.frozen())
    return stack
