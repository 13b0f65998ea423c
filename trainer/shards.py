"""Each iteration's N real and N fake latents, sharded by global index across processes.

Rank r owns the global indices `shard_range(N, r, P)` of both sets: it generates those fakes
(sample i's noise seeded from (seed, k, i), so fakes do not depend on world or batch size) and
encodes those reals. The main process alone receives the gathered sets and writes them; no other
rank ever holds all N. A rerun reads its own slice back from the saved files (memory-mapped).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import faults, io, timing
from .distributed import barrier, gather_shards, shard_range
from .errors import UserError
from .runtime import derive_seed
from .sampling import ddim_sample, initial_noise


@dataclass
class Shard:
    n: int                 # N, the global count of each set
    own: range             # global indices this rank owns
    real: torch.Tensor     # (len(own), C, H, W), model-space latents
    fake: torch.Tensor
    reused: bool


def choose_real_rows(n_rows: int, n: int, seed: int, k: int, replace: bool) -> np.ndarray:
    if n > n_rows and not replace:
        raise UserError(f"--num_samples {n} exceeds the {n_rows} manifest rows left after filters; lower it, "
                        f"or set stage2.sample_with_replacement: true")
    rng = np.random.default_rng(derive_seed(seed, "reals", k))
    return rng.choice(n_rows, size=n, replace=n > n_rows)


def _load_own(path: Path, n: int, own: range, shape: tuple) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        full = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: unreadable latents ({type(e).__name__}); delete it to regenerate") from None
    if not isinstance(full, torch.Tensor) or tuple(full.shape) != (n, *shape):
        got = tuple(full.shape) if isinstance(full, torch.Tensor) else type(full).__name__
        raise UserError(f"{path}: latents of shape {got}, expected {(n, *shape)}; delete it to regenerate")
    return full[own.start:own.stop].clone()


@torch.inference_mode()
def generate_own(acc, unet, ddim, own: range, shape: tuple, *, seed: int, k: int, steps: int, eta: float,
                 batch_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's fakes: DDIM from per-sample noise, nothing decoded, written batch by batch into `out`
    (len(own) rows, on any device; a new CPU tensor by default), which is returned."""
    from .progress import bar

    if out is None:
        out = torch.empty((len(own), *shape))  # filled batch by batch: no list of batches + a concatenated copy
    assert tuple(out.shape) == (len(own), *shape), (tuple(out.shape), len(own), shape)
    progress = bar(acc, len(own), f"fakes {k}", "sample")
    for s in range(own.start, own.stop, batch_size):
        faults.point(f"gen:k{k}:b{s}")
        idx = list(range(s, min(s + batch_size, own.stop)))
        noise = initial_noise(idx, shape, seed, "fake", k).to(acc.device)
        with acc.autocast():
            z = ddim_sample(unet, ddim, noise, steps, eta=eta, batch_size=len(idx),
                            gen_parts=(seed, "fake", k), indices=idx)
        out[s - own.start:s - own.start + len(idx)] = z.float().to(out.device)
        progress.update(len(idx))
    progress.close()
    return out


def iteration_shard(ctx, k: int, gen_unet, folder: Path, log) -> Shard:
    """Load or produce this rank's reals and fakes for iteration k; the main process writes the sets."""
    cfg, acc = ctx.cfg, ctx.acc
    faults.phase(f"k{k}")
    n = cfg.stage2.num_samples
    own = shard_range(n, acc.process_index, acc.num_processes)
    real_path, fake_path = folder / "real_latents.pt", folder / "fake_latents.pt"
    fake = _load_own(fake_path, n, own, ctx.latent_shape)
    real = _load_own(real_path, n, own, ctx.latent_shape)
    reused = fake is not None and real is not None
    if fake is None:
        log(f"iteration {k}: generating {n} fakes ({cfg.stage2.generation_steps} DDIM steps, "
            f"{acc.num_processes} process(es))")
        with timing.phase(acc, ctx.out_dir, "generation", k):
            fake = produce_gathered(acc, n, own, ctx.latent_shape, fake_path, lambda dest: generate_own(
                acc, gen_unet, ctx.ddim, own, ctx.latent_shape, seed=cfg.training.seed, k=k,
                steps=cfg.stage2.generation_steps, eta=cfg.stage2.eta, batch_size=cfg.stage2.generation_batch_size,
                out=dest))
    if real is None:
        rows = choose_real_rows(len(ctx.rows), n, cfg.training.seed, k, cfg.stage2.sample_with_replacement)
        mine = ctx.rows.iloc[rows[own.start:own.stop]]
        log(f"iteration {k}: encoding {n} reals")
        with timing.phase(acc, ctx.out_dir, "encoding", k):
            real = produce_gathered(acc, n, own, ctx.latent_shape, real_path,
                                    lambda dest: ctx.encode_local(mine, out=dest))
    if reused:
        log(f"iteration {k}: reusing saved latents in {folder}")
    return Shard(n=n, own=own, real=real, fake=fake, reused=reused)


def produce_gathered(acc, n: int, own: range, shape: tuple, path: Path, fill) -> torch.Tensor:
    """Make this rank's rows of an n-row set with `fill(dest)` (dest: len(own) rows to write into), gather
    every rank's rows to the main process, write `path` there (atomically), and return this rank's rows
    on the CPU. A collective: call it on every rank.

    Memory: a non-main rank holds its own rows only. The main process of a multi-process run fills its
    rows straight into the preallocated n-row result (on the accelerator when there is one) and receives
    the others' rows after them, so it holds the result alone, not its rows + the result; once the file
    is written it frees the result and reads its own rows back from that file.
    """
    world = acc.num_processes
    point = f"gather:{path.parent.name}/{path.name}"
    if world > 1 and acc.is_main_process:
        assert own.start == 0, own  # the main process (rank 0) owns the first block
        dev = acc.device if acc.device.type != "cpu" else torch.device("cpu")
        full = torch.empty((n, *shape), device=dev)
        fill(full[: len(own)])
        faults.point(point)
        full = gather_shards(full[: len(own)], n, to_all=False, out=full)
        io.save_torch(full.cpu().contiguous(), path)
        del full
        barrier()
        return _load_own(path, n, own, shape)
    local = torch.empty((len(own), *shape))
    fill(local)
    faults.point(point)
    # on CPU, acc.device is cpu:0 and .to() it would copy the whole shard (a CPU tensor's device is "cpu")
    dev = acc.device
    full = gather_shards(local if dev.type == "cpu" else local.to(dev), n, to_all=False)
    if acc.is_main_process:  # one process: `full` is `local`
        io.save_torch(full.cpu().contiguous(), path)
    barrier()
    return local


def stratified_split(n: int, fraction: float, seed: int, k: int, label: str) -> np.ndarray:
    """Boolean mask over global indices 0..n-1: True = train. Shuffled, fixed seed, both sides non-empty."""
    perm = np.random.default_rng(derive_seed(seed, "split", k, label)).permutation(n)
    n_train = min(n - 1, max(1, int(round(n * fraction)))) if n > 1 else n
    mask = np.zeros(n, dtype=bool)
    mask[perm[:n_train]] = True
    return mask
