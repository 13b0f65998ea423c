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
                 batch_size: int) -> torch.Tensor:
    """This rank's fakes: DDIM from per-sample noise, nothing decoded. Returned on the CPU."""
    from .progress import bar

    out = torch.empty((len(own), *shape))  # filled batch by batch: no list of batches + a concatenated copy
    progress = bar(acc, len(own), f"fakes {k}", "sample")
    for s in range(own.start, own.stop, batch_size):
        faults.point(f"gen:k{k}:b{s}")
        idx = list(range(s, min(s + batch_size, own.stop)))
        noise = initial_noise(idx, shape, seed, "fake", k).to(acc.device)
        with acc.autocast():
            z = ddim_sample(unet, ddim, noise, steps, eta=eta, batch_size=len(idx),
                            gen_parts=(seed, "fake", k), indices=idx)
        out[s - own.start:s - own.start + len(idx)] = z.float().cpu()
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
            fake = generate_own(acc, gen_unet, ctx.ddim, own, ctx.latent_shape, seed=cfg.training.seed, k=k,
                                steps=cfg.stage2.generation_steps, eta=cfg.stage2.eta,
                                batch_size=cfg.stage2.generation_batch_size)
            _write_gathered(acc, fake, n, fake_path)
    if real is None:
        rows = choose_real_rows(len(ctx.rows), n, cfg.training.seed, k, cfg.stage2.sample_with_replacement)
        mine = ctx.rows.iloc[rows[own.start:own.stop]]
        log(f"iteration {k}: encoding {n} reals")
        with timing.phase(acc, ctx.out_dir, "encoding", k):
            real = ctx.encode_local(mine)
            _write_gathered(acc, real, n, real_path)
    if reused:
        log(f"iteration {k}: reusing saved latents in {folder}")
    return Shard(n=n, own=own, real=real, fake=fake, reused=reused)


def _write_gathered(acc, local: torch.Tensor, n: int, path: Path) -> None:
    faults.point(f"gather:{path.parent.name}/{path.name}")
    # on CPU, acc.device is cpu:0 and .to() it would copy the whole shard (a CPU tensor's device is "cpu")
    dev = acc.device
    full = gather_shards(local if local.device.type == dev.type == "cpu" else local.to(dev), n, to_all=False)
    if acc.is_main_process:
        io.save_torch(full.cpu().contiguous(), path)
    barrier()


def stratified_split(n: int, fraction: float, seed: int, k: int, label: str) -> np.ndarray:
    """Boolean mask over global indices 0..n-1: True = train. Shuffled, fixed seed, both sides non-empty."""
    perm = np.random.default_rng(derive_seed(seed, "split", k, label)).permutation(n)
    n_train = min(n - 1, max(1, int(round(n * fraction)))) if n > 1 else n
    mask = np.zeros(n, dtype=bool)
    mask[perm[:n_train]] = True
    return mask
