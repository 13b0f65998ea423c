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

from trainer.core import faults
from trainer.core.errors import UserError
from trainer.core.progress import bar
from trainer.core.seeds import derive_seed
from trainer.data.latents import load_latent_set
from trainer.diffusion.conditioning import model_output
from trainer.diffusion.noise import per_sample_noise, per_sample_timesteps
from trainer.diffusion.sampling import ddim_sample
from trainer.files import atomic, timing
from trainer.parallel import collectives
from trainer.parallel.collectives import barrier, shard_range


@dataclass
class Shard:
    n: int  # N, the global count of each set
    own: range  # global indices this rank owns
    real: torch.Tensor  # (len(own), C, H, W), model-space latents
    fake: torch.Tensor
    reused: bool
    real_labels: torch.Tensor | None = None  # this rank's rows' classes (a class-conditional run)
    fake_labels: torch.Tensor | None = None


def choose_real_rows(n_rows: int, n: int, seed: int, k: int, replace: bool) -> np.ndarray:
    if n > n_rows and not replace:
        raise UserError(
            f"--num_samples {n} exceeds the {n_rows} manifest rows left after filters; lower it, "
            f"or set stage2.sample_with_replacement: true"
        )
    rng = np.random.default_rng(derive_seed(seed, "reals", k))
    return rng.choice(n_rows, size=n, replace=n > n_rows)


def _load_own(path: Path, n: int, own: range, shape: tuple) -> torch.Tensor | None:
    """This rank's rows of a saved set, or None where the set was not written yet."""
    return load_latent_set(path, n, shape, own) if path.is_file() else None


@torch.inference_mode()
def generate_own(
    accelerator,
    unet,
    ddim,
    own: range,
    shape: tuple,
    *,
    seed: int,
    k: int,
    steps: int,
    eta: float,
    batch_size: int,
    out: torch.Tensor | None = None,
    labels=None,
    sampling: dict | None = None,
) -> torch.Tensor:
    """This rank's fakes: DDIM from per-sample noise, nothing decoded, written batch by batch into `out`
    (len(own) rows, on any device; a new CPU tensor by default), which is returned. A class-conditional
    model's: `labels` (trainer.stage2.labels.RunLabels) and the N fakes' labels in `sampling`."""
    if out is None:
        out = torch.empty(
            (len(own), *shape)
        )  # filled batch by batch: no list of batches + a concatenated copy
    assert tuple(out.shape) == (len(own), *shape), (tuple(out.shape), len(own), shape)
    progress = bar(accelerator, len(own), f"fakes {k}", "sample")
    for s in range(own.start, own.stop, batch_size):
        faults.point(f"gen:k{k}:b{s}")
        idx = list(range(s, min(s + batch_size, own.stop)))
        noise = per_sample_noise(idx, shape, seed, "fake", k).to(accelerator.device)
        cond = {} if labels is None else labels.sampling(sampling[s - own.start : s - own.start + len(idx)])
        with accelerator.autocast():
            z = ddim_sample(
                unet,
                ddim,
                noise,
                steps,
                eta=eta,
                batch_size=len(idx),
                gen_parts=(seed, "fake", k),
                indices=idx,
                **cond,
            )
        out[s - own.start : s - own.start + len(idx)] = z.float().to(out.device)
        progress.update(len(idx))
    progress.close()
    return out


def _iteration_labels(accelerator, cfg, layout, k: int, labels, picked):
    """(the N fakes' labels, the N reals' classes) of a class-conditional run (None, None otherwise); the
    main process writes them beside the sets where they are not there yet."""
    if labels is None:
        return None, None
    fake_labels, real_labels = labels.fakes(len(picked), cfg.training.seed, k), labels.of_rows(picked)
    if accelerator.is_main_process:
        layout.iteration_folder(k).mkdir(parents=True, exist_ok=True)
        for path, y in ((layout.fake_latents(k), fake_labels), (layout.real_latents(k), real_labels)):
            if not layout.labels_of(path).is_file():
                atomic.save_torch(y.clone(), layout.labels_of(path))
    return fake_labels, real_labels


def iteration_shard(
    accelerator, cfg, layout, k: int, gen_unet, ddim, latent_shape: tuple, rows, codec, log, labels=None
) -> Shard:
    """Load or produce this rank's reals and fakes for iteration k; the main process writes the sets.
    gen_unet/ddim: the model generating fakes and a fresh DDIM sampler; rows: the filtered manifest;
    codec: encodes rows (trainer.data.latents.LatentCodec); labels: a class-conditional run's RunLabels
    (the labels are drawn again on every start, the same ones, and written beside the sets)."""
    faults.phase(f"k{k}")
    n = cfg.stage2.num_samples
    own = shard_range(n, accelerator.process_index, accelerator.num_processes)
    picked = choose_real_rows(len(rows), n, cfg.training.seed, k, cfg.stage2.sample_with_replacement)
    fake_labels, real_labels = _iteration_labels(accelerator, cfg, layout, k, labels, picked)
    real_path, fake_path = layout.real_latents(k), layout.fake_latents(k)
    fake = _load_own(fake_path, n, own, latent_shape)
    real = _load_own(real_path, n, own, latent_shape)
    reused = fake is not None and real is not None
    if fake is None:
        log(
            f"iteration {k}: generating {n} fakes ({cfg.stage2.generation_steps} DDIM steps, "
            f"{accelerator.num_processes} process(es))"
        )
        sampling = None if fake_labels is None else fake_labels[own.start : own.stop]
        s2 = cfg.stage2
        settings = {"steps": s2.generation_steps, "eta": s2.eta, "batch_size": s2.generation_batch_size}

        def fill(dest):
            return generate_own(
                accelerator,
                gen_unet,
                ddim,
                own,
                latent_shape,
                seed=cfg.training.seed,
                k=k,
                out=dest,
                labels=labels,
                sampling=sampling,
                **settings,
            )

        with timing.phase(accelerator, layout.timings, "generation", k):
            fake = produce_gathered(accelerator, n, own, latent_shape, fake_path, fill)
    if real is None:
        mine = rows.iloc[picked[own.start : own.stop]]
        log(f"iteration {k}: encoding {n} reals")
        with timing.phase(accelerator, layout.timings, "encoding", k):
            real = produce_gathered(
                accelerator, n, own, latent_shape, real_path, lambda dest: codec.encode(mine, out=dest)
            )
    if reused:
        log(f"iteration {k}: reusing saved latents in {layout.iteration_folder(k)}")
    mine_of = (lambda y: None) if labels is None else (lambda y: y[own.start : own.stop])
    ys = {"real_labels": mine_of(real_labels), "fake_labels": mine_of(fake_labels)}
    return Shard(n=n, own=own, real=real, fake=fake, reused=reused, **ys)


def x0_pred_fakes(
    accelerator,
    cfg,
    schedule,
    unet,
    real: torch.Tensor,
    own: range,
    k: int,
    latent_shape: tuple,
    labels=None,
    y=None,
):
    """D's fakes in x0_pred mode: one-step x0 predictions of this rank's noised reals, with their t; a
    class-conditional model's (labels: RunLabels) predict with the reals' own classes `y`."""
    seed = cfg.training.seed
    t_max = int(cfg.stage2.x0_pred_max_timestep * schedule.num_steps)
    t = per_sample_timesteps(own, t_max, seed, "x0t", k)
    fakes = []
    with torch.inference_mode():
        for s in range(0, len(own), 256):
            idx = list(own)[s : s + 256]
            x0 = real[s : s + 256].to(accelerator.device)
            noise = per_sample_noise(idx, latent_shape, seed, "x0n", k).to(x0.device)
            tt = t[s : s + 256].to(x0.device)
            x_t = schedule.add_noise(x0, noise, tt)
            with accelerator.autocast():
                if labels is None:
                    out = unet(x_t, tt).sample.float()
                else:
                    c = labels.sampling(y[s : s + 256])
                    out = model_output(
                        unet, x_t, tt, c["class_labels"], labels.scale, labels.null_class
                    ).float()
            fakes.append(schedule.predictions(out, x_t, tt)[1].cpu())
    return (torch.cat(fakes) if fakes else real[:0].clone()), t


def produce_gathered(accelerator, n: int, own: range, shape: tuple, path: Path, fill) -> torch.Tensor:
    """Make this rank's rows of an n-row set with `fill(dest)` (dest: len(own) rows to write into), gather
    every rank's rows to the main process, write `path` there (atomically), and return this rank's rows
    on the CPU. A collective: call it on every rank.

    Memory: a non-main rank holds its own rows only. The main process of a multi-process run fills its
    rows straight into the preallocated n-row result (on the accelerator when there is one) and receives
    the others' rows after them, so it holds the result alone, not its rows + the result; once the file
    is written it frees the result and reads its own rows back from that file.
    """
    world = accelerator.num_processes
    point = f"gather:{path.parent.name}/{path.name}"
    if world > 1 and accelerator.is_main_process:
        assert own.start == 0, own  # the main process (rank 0) owns the first block
        dev = accelerator.device if accelerator.device.type != "cpu" else torch.device("cpu")
        full = torch.empty((n, *shape), device=dev)
        fill(full[: len(own)])
        faults.point(point)
        full = collectives.gather_shards(full[: len(own)], n, to_all=False, out=full)
        atomic.save_torch(full.cpu().contiguous(), path)
        del full
        barrier()
        return _load_own(path, n, own, shape)
    local = torch.empty((len(own), *shape))
    fill(local)
    faults.point(point)
    # on CPU, accelerator.device is cpu:0 and .to() it would copy the whole shard (a CPU tensor: "cpu")
    dev = accelerator.device
    full = collectives.gather_shards(local if dev.type == "cpu" else local.to(dev), n, to_all=False)
    if accelerator.is_main_process:  # one process: `full` is `local`
        atomic.save_torch(full.cpu().contiguous(), path)
    barrier()
    return local


def stratified_split(n: int, fraction: float, seed: int, k: int, label: str) -> np.ndarray:
    """Boolean mask over global indices 0..n-1: True = train. Shuffled, fixed seed, both sides non-empty."""
    perm = np.random.default_rng(derive_seed(seed, "split", k, label)).permutation(n)
    n_train = min(n - 1, max(1, int(round(n * fraction)))) if n > 1 else n
    mask = np.zeros(n, dtype=bool)
    mask[perm[:n_train]] = True
    return mask
