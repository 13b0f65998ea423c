"""The random draws of diffusion training and sampling, each derived from named seed parts (never from
a running RNG), so a draw is the same at any world size, batch size and after any resume."""

from __future__ import annotations

import torch

from trainer.core.seeds import generator


def per_sample_noise(indices, shape: tuple, *seed_parts) -> torch.Tensor:
    """Noise for global sample indices; sample i's noise depends only on (seed_parts, i)."""
    return (
        torch.stack([torch.randn(shape, generator=generator(*seed_parts, int(i))) for i in indices])
        if len(indices)
        else torch.empty((0, *shape))
    )


def per_sample_timesteps(indices, t_max: int, *seed_parts) -> torch.Tensor:
    """A timestep in [0, t_max) for each global sample index, from (seed_parts, i)."""
    return torch.tensor(
        [int(torch.randint(0, t_max, (1,), generator=generator(*seed_parts, int(i)))) for i in indices],
        dtype=torch.long,
    )


def batch_noise_and_timesteps(shape: tuple, t_max: int, *seed_parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of `shape` and one timestep in [0, t_max) per row, both from one generator (seed_parts)."""
    g = generator(*seed_parts)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, t_max, (shape[0],), generator=g)
    return noise, t


def avoid_timesteps(t: torch.Tensor, banned, t_max: int, *seed_parts) -> torch.Tensor:
    """`t` (timesteps in [0, t_max)) with every entry that is one of `banned` redrawn uniformly from the
    others, entry i's redraw from (seed_parts, i): uniform draws stay uniform over the allowed timesteps,
    and entries not banned are unchanged."""
    banned = torch.as_tensor(banned, dtype=torch.long).unique()
    hit = torch.isin(t, banned.to(t.device))
    if not bool(hit.any()):
        return t
    keep = torch.ones(t_max, dtype=torch.bool)
    keep[banned[(banned >= 0) & (banned < t_max)]] = False
    allowed = torch.nonzero(keep).flatten()
    rows = torch.nonzero(hit).flatten().tolist()
    out = t.clone()
    out[rows] = allowed[per_sample_timesteps(rows, len(allowed), *seed_parts)].to(t.device, t.dtype)
    return out


def eta_generators(indices, *seed_parts) -> list:
    """Per-sample generators of DDIM's eta > 0 step noise."""
    return [generator(*seed_parts, "eta", int(i)) for i in indices]


def noised_between(schedule, z: torch.Tensor, indices, t_min: float, t_max: float, *seed_parts):
    """(z_t, t): `z` forward-noised to a timestep in [t_min, t_max) x num_steps per sample; sample i's
    noise and timestep depend only on (seed_parts, indices[i]). Differentiable in z."""
    n = schedule.num_steps
    lo = min(int(t_min * n), n - 1)
    hi = max(lo + 1, int(t_max * n))
    noise = per_sample_noise(indices, tuple(z.shape[1:]), *seed_parts, "noise").to(z.device, z.dtype)
    t = (per_sample_timesteps(indices, hi - lo, *seed_parts, "t") + lo).to(z.device)
    return schedule.add_noise(z, noise, t), t


def noised_inputs(schedule, z: torch.Tensor, indices, max_timestep: float, *seed_parts):
    """(z_t, t): `z` forward-noised to a timestep in [0, max_timestep x num_steps) per sample (a noise-
    conditioned discriminator's input)."""
    return noised_between(schedule, z, indices, 0.0, max_timestep, *seed_parts)
