"""One small step-loop shared by every stage: interval logging and evaluation, best/latest exports,
and a single-file resume state that restores the run exactly.

All randomness in a step is derived from (seed, stage, step), never from a running RNG, so a run
resumed at step k draws exactly what the uninterrupted run drew. The state is written by the main
process only (under DDP every rank holds identical model and optimizer state), atomically.

A step ends with `apply_update` (trainer/training/update.py), which skips non-finite steps; their
counters are part of the resume state and the history (`nonfinite_skipped`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from trainer.core import faults
from trainer.core.errors import UserError
from trainer.core.log import Logger
from trainer.core.progress import bar
from trainer.core.seeds import derive_seed, generator
from trainer.files import atomic, read
from trainer.parallel import engine, preempt
from trainer.parallel.accelerator import tracker_step
from trainer.parallel.collectives import all_reduce_sum, barrier, shard_range
from trainer.training.update import GuardedUpdate

STATE_FORMAT = "advdiff.state"


def batch_indices(train_idx: np.ndarray, batch: int, step: int, seed: int, stage: str) -> np.ndarray:
    """The global batch of `step`: epoch-wise reshuffled, drop-last, derived from (seed, stage, epoch)."""
    per_epoch = max(1, len(train_idx) // batch)
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng(derive_seed(seed, stage, "epoch", epoch)).permutation(len(train_idx))
    take = perm[j * batch : (j + 1) * batch]
    if len(take) < batch:  # fewer rows than one batch: wrap around
        take = np.resize(perm, batch)
    return train_idx[take]


def draw_local(positions: np.ndarray, n_local: int, step: int, per_epoch: int, *seed_parts) -> np.ndarray:
    """`n_local` of this rank's own `positions` for `step`: walks a per-epoch permutation (seeded from
    seed_parts and the epoch), wrapping around when the shard is shorter than an epoch needs."""
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng(derive_seed(*seed_parts, epoch)).permutation(len(positions))
    if not len(perm):
        return positions[:0]
    return positions[np.resize(np.roll(perm, -j * n_local), n_local)]


def walk_rows(n: int, slots, draw: int, batch: int, *seed_parts) -> np.ndarray:
    """Rows of 0..n-1 for the slots of the draw-th global batch of `batch`: slot i takes place
    draw x batch + i of a walk over per-epoch permutations (seeded from seed_parts and the epoch), so a
    slot's row is the same at any world size and after any resume."""
    rows, perms = [], {}
    for i in slots:
        epoch, j = divmod(draw * batch + int(i), n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng(derive_seed(*seed_parts, epoch)).permutation(n)
        rows.append(perms[epoch][j])
    return np.asarray(rows, dtype=np.int64)


def rank_slice(global_batch, rank: int, world: int):
    r = shard_range(len(global_batch), rank, world)
    return global_batch[r.start : r.stop]


def local_weight(n_local: int, n_global: int, world: int) -> float:
    """Factor turning a local mean into this rank's share, so DDP's average is the global mean."""
    return n_local * world / n_global


class StepTrainer(GuardedUpdate):
    """Subclasses implement train_step, evaluate, the state hooks and export.

    stage: the name in log lines, seeds and fault points (stage0, stage1, stage2_d0, stage2_g1, ...);
    metric: the validation metric that picks "best"; state_path / history_path: the resume state and
    the validation CSV; phase_label: how the RESUMED line names the phase ("iteration 1, discriminator
    phase")."""

    history_fields: list[str] | None = None  # CSV column order (default: order of first appearance)

    def __init__(
        self,
        accelerator,
        *,
        stage: str,
        state_path: Path,
        history_path: Path,
        max_steps: int,
        eval_interval: int,
        log_interval: int,
        seed: int,
        fingerprint: dict,
        metric: str = "val_loss",
        max_nonfinite_steps: int = 5,
        phase_label: str | None = None,
    ):
        self.accelerator = accelerator
        self.stage, self.metric, self.phase_label = stage, metric, phase_label
        self.state_path, self.history_path = Path(state_path), Path(history_path)
        self.max_steps, self.eval_interval, self.log_interval = max_steps, eval_interval, log_interval
        self.seed, self.fingerprint = seed, fingerprint
        self.step = 0
        self.stop_after: int | None = None  # stop (with a resume state) after this many steps in this call
        self._sums: dict = {}
        self._count = 0
        self._last_train: dict = {}
        self.best = {"value": math.inf, "step": -1}
        self.history: list[dict] = []
        # Non-finite steps: the total skipped (resume state, history column), the current run of
        # consecutive skips (length, first step number), whether this step was skipped, a checkpoint
        # postponed until that run ends, and the step of the last resume state on disk.
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_skipped = 0
        self._bad_run, self._bad_first = 0, 0
        self._step_skipped = False
        self._checkpoint_due = False
        self._saved_step: int | None = None
        self.log = Logger(accelerator, self.stage)
        if accelerator.is_main_process:
            atomic.remove_stale_temps(self.state_path.parent)  # temp files of writes a kill interrupted

    # -- hooks ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def model_state(self) -> dict:
        raise NotImplementedError

    def load_model_state(self, state: dict) -> None:
        raise NotImplementedError

    def export(self, tag: str, metrics: dict) -> None:
        """Write the `tag` ("best" or "latest") export. Called on every rank (weights may need a
        gather); only the main process writes."""
        raise NotImplementedError

    def optimizer_state(self, opt):
        """Optimizer state for the single-file state; under DeepSpeed it lives in the engine's checkpoint."""
        return None if engine.is_deepspeed(self.accelerator) else opt.state_dict()

    def load_optimizer_state(self, opt, state) -> None:
        if state is not None and not engine.is_deepspeed(self.accelerator):
            opt.load_state_dict(state)

    def finish(self) -> None:
        """After the last step, on every rank (collectives allowed)."""

    def baseline(self) -> dict | None:
        """Metrics of the starting weights, or None. Where given, a fresh run exports them as "best" at
        step 0, so a run whose every step is worse than where it started keeps its start as its best."""
        return None

    # -- machinery -----------------------------------------------------------------------------
    @property
    def acc(self):
        """The old name of `accelerator`, read-only (subclasses and callers still use it)."""
        return self.accelerator

    @property
    def rank(self):
        return self.accelerator.process_index

    @property
    def world(self):
        return self.accelerator.num_processes

    def step_generator(self, step: int, *tag):
        return generator(self.seed, self.stage, step, *tag)

    def try_resume(self) -> bool:
        if not self.state_path.is_file():
            return False
        try:  # weights only: a state from a folder someone else shared or changed can run no code
            state = self.unwrap_state(read.torch_load(self.state_path, "resume state", mmap=False))
        except Exception as e:
            why = (
                e
                if isinstance(e, UserError)
                else f"{self.state_path}: resume state unreadable ({type(e).__name__})"
            )
            raise UserError(f"{why}; delete it to restart {self.stage}") from None
        if (
            not isinstance(state, dict)
            or state.get("format") != STATE_FORMAT
            or state.get("stage") != self.stage
        ):
            raise UserError(f"{self.state_path}: not a {self.stage} resume state")
        old, mine = state["fingerprint"], atomic.plain(self.fingerprint)  # mine as saved: paths as str, ...
        changed = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
        if changed:
            raise UserError(
                f"{self.state_path}: the config changed since this state was written "
                f"({', '.join(changed)}); use a new experiment.save_path or restore the config"
            )
        self.load_model_state(state["model"])
        if engine.is_deepspeed(self.accelerator):
            folder = self.engine_state_path
            if not folder.is_dir():
                raise UserError(
                    f"{folder}: DeepSpeed state missing beside {self.state_path}; delete both to restart"
                )
            read.check_torch_files(
                folder, "DeepSpeed state", f"; delete it and {self.state_path.name} to restart"
            )
            engine.load_engine_state(self.accelerator, folder)
        self.step, self.best, self.history = state["step"], state["best"], state["history"]
        # the saved sums are totals over ranks: rank 0 carries them, the others restart from zero
        sums = state["log_sums"] if self.rank == 0 else {k: 0.0 for k in state["log_sums"]}
        self._sums, self._count, self._last_train = dict(sums), state["log_count"], state["last_train"]
        # states written before non-finite steps were counted have none of these keys
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self._bad_run, self._bad_first = (int(x) for x in state.get("nonfinite_run", (0, 0)))
        self._checkpoint_due = bool(state.get("checkpoint_due", False))
        self._saved_step = self.step
        what = f"{self.phase_label}, " if self.phase_label else ""
        self.log(f"RESUMED {what}from {self.state_path} at step {self.step}/{self.max_steps}")
        return True

    @property
    def engine_state_path(self) -> Path:
        return self.state_path.with_name(self.state_path.stem + ".deepspeed")

    def save_state(self) -> None:
        # Built on every rank: under ZeRO-3 reading the weights is a collective. The partial log
        # window's sums are reduced too, so a resume continues the same averages at any world size.
        keys = sorted(self._sums)
        totals = (
            all_reduce_sum(
                torch.tensor(
                    [self._sums[k] for k in keys], dtype=torch.float64, device=self.accelerator.device
                )
            ).tolist()
            if keys
            else []
        )
        blob = self.wrap_state(
            {
                "format": STATE_FORMAT,
                "stage": self.stage,
                "step": self.step,
                "best": self.best,
                "history": self.history,
                "fingerprint": self.fingerprint,
                "complete": self.step >= self.max_steps,
                "log_sums": dict(zip(keys, totals, strict=True)),
                "log_count": self._count,
                "last_train": self._last_train,
                "nonfinite_skipped": self.nonfinite_skipped,
                "nonfinite_run": [self._bad_run, self._bad_first],
                "checkpoint_due": self._checkpoint_due,
                "model": self.model_state(),
            }
        )
        if engine.is_deepspeed(self.accelerator):
            # optimizer partitions: DeepSpeed's own per-rank checkpoint, written before the state naming it
            engine.save_engine_state(self.accelerator, self.engine_state_path)
        if self.accelerator.is_main_process:
            atomic.save_torch(atomic.plain(blob), self.state_path)  # read back with weights_only=True
        barrier()
        self._saved_step = self.step

    def wrap_state(self, state: dict) -> dict:
        """What goes into the state file (a subclass may embed the state in a richer file)."""
        return state

    def unwrap_state(self, blob: dict) -> dict:
        return blob

    def fit(self) -> dict:
        """Train to max_steps (resuming if a state exists); returns the best metric record."""
        if not self.try_resume() and self.best["step"] < 0:
            self._baseline()
        if self.step >= self.max_steps:
            self.log(f"already complete ({self.step} steps); nothing to do")
            self.finish()
            return self.best
        start, t_last = self.step, time.time()
        progress = bar(self.accelerator, self.max_steps, self.stage, "step", initial=self.step)
        try:
            self._run_steps(start, t_last, progress)
        finally:
            progress.close()
        if self.step >= self.max_steps:
            self.finish()
        return self.best

    def _run_steps(self, start: int, t_last: float, progress) -> None:
        while self.step < self.max_steps:
            faults.step(self.stage, self.step, self.state_path)
            if self.stop_after is not None and self.step - start >= self.stop_after:
                self.save_state()
                self.log(f"stopped at step {self.step} as asked; resume state in {self.state_path}")
                return
            if preempt.should_stop(self.accelerator.device):
                self.save_state()
                self.log(f"preempted at step {self.step}; resume state in {self.state_path}")
                preempt.stop(self.accelerator, f"{self.stage} at step {self.step}")
            # Dropout and anything else drawing from the global RNG: seeded per step and rank.
            torch.manual_seed(derive_seed(self.seed, self.stage, "global", self.step, self.rank))
            logs = self.train_step(self.step)
            self.step += 1
            progress.update(1)
            if self._step_skipped:  # a skipped step's losses stay out of the averages (alike on every rank)
                self._step_skipped = False
            else:
                for k, v in logs.items():
                    self._sums[k] = self._sums.get(k, 0.0) + float(v)
                self._count += 1
            if self.step % self.log_interval == 0 or self.step == self.max_steps:
                if self._count:
                    keys = sorted(self._sums)
                    red = all_reduce_sum(
                        torch.tensor(
                            [self._sums[k] for k in keys], dtype=torch.float64, device=self.accelerator.device
                        )
                    ) / (self._count * self.world)
                    rate = self._count / max(1e-9, time.time() - t_last)
                    self._last_train = dict(zip(keys, red.tolist(), strict=True))
                    self.log(
                        f"step {self.step}/{self.max_steps} "
                        + " ".join(f"{k}={v:.4g}" for k, v in self._last_train.items())
                        + f" ({rate:.2f} it/s)"
                    )
                else:
                    self._last_train = {}
                    self.log(
                        f"step {self.step}/{self.max_steps}: every step since the last status line was "
                        "skipped"
                    )
                self._sums, self._count, t_last = {}, 0, time.time()
            if self.step % self.eval_interval == 0 or self.step == self.max_steps:
                self._checkpoint_due = True
            # During a run of skipped steps a checkpoint waits for the next applied step, so the files
            # on disk stay those written before the run began (at the last step it is written anyway:
            # the weights are still those of the last applied update).
            if self._checkpoint_due and (self._bad_run == 0 or self.step == self.max_steps):
                self._checkpoint_due = False
                self._checkpoint()

    def _baseline(self) -> None:
        metrics = self.baseline()
        if metrics is None:
            return
        self.best = {"value": float(metrics[self.metric]), "step": 0}
        self.export("best", {"step": 0, **metrics})
        self.log("start point: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + " (best so far)")

    def _checkpoint(self) -> None:
        metrics = self.evaluate()
        row = {
            "step": self.step,
            **{f"train_{k}": v for k, v in self._last_train.items()},
            **metrics,
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        self.history.append(row)
        value, best = float(metrics[self.metric]), float(self.best["value"])
        # NaN is never better than a number, but the first validation always exports a "best", so a
        # later phase that loads it finds one
        improved = self.best["step"] < 0 or (not math.isnan(value) and (math.isnan(best) or value < best))
        if improved:
            self.best = {"value": value, "step": self.step}
            self.export("best", row)
        self.export("latest", row)
        if self.accelerator.is_main_process:
            atomic.write_csv(self.history, self.history_path, self.history_fields)
        self.accelerator.log(
            {f"{self.stage}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
            step=tracker_step(getattr(self, "cfg", None), self.stage, self.step),
        )  # one step for the run
        self.log(
            f"eval at step {self.step}: "
            + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            + (" (best)" if improved else "")
        )
        self.save_state()
