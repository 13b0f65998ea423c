"""One small step-loop shared by every stage: interval logging and evaluation, best/latest exports,
and a single-file resume state that restores the run exactly.

All randomness in a step is derived from (seed, stage, step), never from a running RNG, so a run
resumed at step k draws exactly what the uninterrupted run drew. The state is written by the main
process only (under DDP every rank holds identical model and optimizer state), atomically.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from . import engine, io, preempt
from .distributed import all_reduce_sum, barrier
from .errors import UserError
from .progress import bar
from .runtime import Logger, derive_seed, generator

STATE_FORMAT = "advdiff.state"


def batch_indices(train_idx: np.ndarray, batch: int, step: int, seed: int, stage: str) -> np.ndarray:
    """The global batch of `step`: epoch-wise reshuffled, drop-last, derived from (seed, stage, epoch)."""
    per_epoch = max(1, len(train_idx) // batch)
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng(derive_seed(seed, stage, "epoch", epoch)).permutation(len(train_idx))
    take = perm[j * batch:(j + 1) * batch]
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


def rank_slice(global_batch, rank: int, world: int):
    from .distributed import shard_range

    r = shard_range(len(global_batch), rank, world)
    return global_batch[r.start:r.stop]


def local_weight(n_local: int, n_global: int, world: int) -> float:
    """Factor turning a local mean into this rank's share, so DDP's average is the global mean."""
    return n_local * world / n_global


def cosine_with_warmup(step: int, warmup: int, total: int, kind: str = "cosine") -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


class StepTrainer:
    """Subclasses set `stage`, `metric` and implement train_step, evaluate, state and export hooks."""

    stage = "stage"
    metric = "val_loss"
    history_fields: list[str] | None = None  # CSV column order (default: order of first appearance)

    def __init__(self, accelerator, out_dir: Path, *, max_steps: int, eval_interval: int, log_interval: int,
                 seed: int, fingerprint: dict):
        self.acc = accelerator
        self.out_dir = Path(out_dir)
        self.max_steps, self.eval_interval, self.log_interval = max_steps, eval_interval, log_interval
        self.seed, self.fingerprint = seed, fingerprint
        self.step = 0
        self.stop_after: int | None = None  # stop (with a resume state) after this many steps in this call
        self._sums: dict = {}
        self._count = 0
        self._last_train: dict = {}
        self.best = {"value": math.inf, "step": -1}
        self.history: list[dict] = []
        self.log = Logger(accelerator, self.stage)
        self.state_path = self.out_dir / "state.pt"
        self.history_path = self.out_dir / "history.csv"

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

    def apply_update(self, loss, wrapped, plain, opt, sched, max_grad_norm: float, ema=None) -> None:
        """Backward, clip (DeepSpeed clips inside its own step), step the optimizer and LR schedule, and
        update the EMA of `plain`'s weights (gathered first under ZeRO-3)."""
        self.acc.backward(loss)
        if max_grad_norm > 0 and not engine.is_deepspeed(self.acc):
            self.acc.clip_grad_norm_(wrapped.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with engine.full_parameters(self.acc, plain):
                ema.step(plain.parameters())

    def optimizer_state(self, opt):
        """Optimizer state for the single-file state; under DeepSpeed it lives in the engine's checkpoint."""
        return None if engine.is_deepspeed(self.acc) else opt.state_dict()

    def load_optimizer_state(self, opt, state) -> None:
        if state is not None and not engine.is_deepspeed(self.acc):
            opt.load_state_dict(state)

    def finish(self) -> None:
        """After the last step, on every rank (collectives allowed)."""

    # -- machinery -----------------------------------------------------------------------------
    @property
    def rank(self):
        return self.acc.process_index

    @property
    def world(self):
        return self.acc.num_processes

    def step_generator(self, step: int, *tag):
        return generator(self.seed, self.stage, step, *tag)

    def try_resume(self) -> bool:
        if not self.state_path.is_file():
            return False
        try:
            state = self.unwrap_state(torch.load(self.state_path, map_location="cpu", weights_only=False))
        except Exception as e:
            raise UserError(f"{self.state_path}: resume state unreadable ({type(e).__name__}); "
                            f"delete it to restart {self.stage}") from None
        if state.get("format") != STATE_FORMAT or state.get("stage") != self.stage:
            raise UserError(f"{self.state_path}: not a {self.stage} resume state")
        changed = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint)
                         if state["fingerprint"].get(k) != self.fingerprint.get(k))
        if changed:
            raise UserError(f"{self.state_path}: the config changed since this state was written "
                            f"({', '.join(changed)}); use a new experiment.save_path or restore the config")
        self.load_model_state(state["model"])
        if engine.is_deepspeed(self.acc):
            folder = self.engine_state_path
            if not folder.is_dir():
                raise UserError(f"{folder}: DeepSpeed state missing beside {self.state_path}; delete both to restart")
            engine.load_engine_state(self.acc, folder)
        self.step, self.best, self.history = state["step"], state["best"], state["history"]
        # the saved sums are totals over ranks: rank 0 carries them, the others restart from zero
        sums = state["log_sums"] if self.rank == 0 else {k: 0.0 for k in state["log_sums"]}
        self._sums, self._count, self._last_train = dict(sums), state["log_count"], state["last_train"]
        self.log(f"RESUMED from {self.state_path} at step {self.step}/{self.max_steps}")
        return True

    @property
    def engine_state_path(self) -> Path:
        return self.state_path.with_name(self.state_path.stem + ".deepspeed")

    def save_state(self) -> None:
        # Built on every rank: under ZeRO-3 reading the weights is a collective. The partial log
        # window's sums are reduced too, so a resume continues the same averages at any world size.
        keys = sorted(self._sums)
        totals = all_reduce_sum(torch.tensor([self._sums[k] for k in keys], dtype=torch.float64,
                                             device=self.acc.device)).tolist() if keys else []
        blob = self.wrap_state({
            "format": STATE_FORMAT, "stage": self.stage, "step": self.step, "best": self.best,
            "history": self.history, "fingerprint": self.fingerprint, "complete": self.step >= self.max_steps,
            "log_sums": dict(zip(keys, totals)), "log_count": self._count, "last_train": self._last_train,
            "model": self.model_state()})
        if engine.is_deepspeed(self.acc):
            # optimizer partitions: DeepSpeed's own per-rank checkpoint, written before the state that names it
            engine.save_engine_state(self.acc, self.engine_state_path)
        if self.acc.is_main_process:
            io.save_torch(blob, self.state_path)
        barrier()

    def wrap_state(self, state: dict) -> dict:
        """What goes into the state file (a subclass may embed the state in a richer file)."""
        return state

    def unwrap_state(self, blob: dict) -> dict:
        return blob

    def fit(self) -> dict:
        """Train to max_steps (resuming if a state exists); returns the best metric record."""
        self.try_resume()
        if self.step >= self.max_steps:
            self.log(f"already complete ({self.step} steps); nothing to do")
            self.finish()
            return self.best
        start, t_last = self.step, time.time()
        progress = bar(self.acc, self.max_steps, self.stage, "step", initial=self.step)
        try:
            self._run_steps(start, t_last, progress)
        finally:
            progress.close()
        if self.step >= self.max_steps:
            self.finish()
        return self.best

    def _run_steps(self, start: int, t_last: float, progress) -> None:
        while self.step < self.max_steps:
            if self.stop_after is not None and self.step - start >= self.stop_after:
                self.save_state()
                self.log(f"stopped at step {self.step} as asked; resume state in {self.state_path}")
                return
            if preempt.should_stop(self.acc.device):
                self.save_state()
                self.log(f"preempted at step {self.step}; resume state in {self.state_path}")
                preempt.stop(self.acc, f"{self.stage} at step {self.step}")
            # Dropout and anything else drawing from the global RNG: seeded per step and rank.
            torch.manual_seed(derive_seed(self.seed, self.stage, "global", self.step, self.rank))
            logs = self.train_step(self.step)
            self.step += 1
            progress.update(1)
            for k, v in logs.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
            self._count += 1
            if self.step % self.log_interval == 0 or self.step == self.max_steps:
                keys = sorted(self._sums)
                red = all_reduce_sum(torch.tensor([self._sums[k] for k in keys], dtype=torch.float64,
                                                  device=self.acc.device)) / (self._count * self.world)
                rate = self._count / max(1e-9, time.time() - t_last)
                self._last_train = dict(zip(keys, red.tolist()))
                self.log(f"step {self.step}/{self.max_steps} " + " ".join(
                    f"{k}={v:.4g}" for k, v in self._last_train.items()) + f" ({rate:.2f} it/s)")
                self._sums, self._count, t_last = {}, 0, time.time()
            if self.step % self.eval_interval == 0 or self.step == self.max_steps:
                self._checkpoint()

    def _checkpoint(self) -> None:
        metrics = self.evaluate()
        row = {"step": self.step, **{f"train_{k}": v for k, v in self._last_train.items()},
               **metrics}
        self.history.append(row)
        improved = metrics[self.metric] < self.best["value"]
        if improved:
            self.best = {"value": float(metrics[self.metric]), "step": self.step}
        if improved:
            self.export("best", row)
        self.export("latest", row)
        if self.acc.is_main_process:
            io.write_csv(self.history, self.history_path, self.history_fields)
        self.acc.log({f"{self.stage}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                     step=self.step)
        self.log(f"eval at step {self.step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                 + (" (best)" if improved else ""))
        self.save_state()
