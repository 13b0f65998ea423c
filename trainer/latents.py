"""Real latents from manifest rows: read pre-embedded ones or encode images with the frozen AE,
sharded across processes by row index."""
from __future__ import annotations

import torch

from .data import ImageDataset
from .distributed import gather_shards, shard_range
from .errors import UserError
from . import faults


def load_latent_file(path: str, shape: tuple | None) -> torch.Tensor:
    try:
        z = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: latent file not found") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable latent file ({type(e).__name__})") from None
    if not isinstance(z, torch.Tensor):
        raise UserError(f"{path}: expected a tensor, got {type(z).__name__}")
    if z.dim() == 4 and z.shape[0] == 1:
        z = z[0]
    if shape is not None and tuple(z.shape) != tuple(shape):
        raise UserError(f"{path}: latent of shape {tuple(z.shape)}, expected {tuple(shape)}")
    return z.float()


@torch.no_grad()
def encode_local(ae, image_paths: list, latent_paths: list, *, size: int, channels: int, latent_shape: tuple,
                 batch_size: int, device, num_workers: int = 0, progress=None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw (unscaled) latents for the given rows, in order: files where given, else AE means. Written
    into `out` (one row per path, on any device; a new CPU tensor by default), which is returned."""
    if out is None:
        out = torch.empty((len(image_paths), *latent_shape))
    assert tuple(out.shape) == (len(image_paths), *latent_shape), (tuple(out.shape), len(image_paths))
    todo = []
    for j, (img, lat) in enumerate(zip(image_paths, latent_paths)):
        if isinstance(lat, str) and lat:
            out[j] = load_latent_file(lat, latent_shape)
        else:
            todo.append(j)
    if todo:
        from models.autoencoder import encode_mean

        ds = ImageDataset([image_paths[j] for j in todo], size, channels)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        for j, (idx, images) in enumerate(loader):
            faults.point(f"encode:{faults.phase_label()}:b{j}")
            z = encode_mean(ae, images.to(device))
            out[[todo[i] for i in idx.tolist()]] = z.to(out.device)
            if progress is not None:
                progress(len(idx))
    return out


def encode_rows(acc, ae, rows, *, size: int, channels: int, latent_shape: tuple, batch_size: int,
                num_workers: int = 0, to_all: bool = True) -> torch.Tensor | None:
    """Latents of every row of `rows` (a DataFrame slice), sharded across ranks, gathered in order."""
    n = len(rows)
    mine = shard_range(n, acc.process_index, acc.num_processes)
    image_paths = rows["image_path"].tolist()[mine.start:mine.stop]
    latent_paths = rows["latent_path"].tolist()[mine.start:mine.stop]
    local = encode_local(ae, image_paths, latent_paths, size=size, channels=channels, latent_shape=latent_shape,
                         batch_size=batch_size, device=acc.device, num_workers=num_workers)
    gathered = gather_shards(local.to(acc.device), n, to_all=to_all)
    return None if gathered is None else gathered.cpu()


def latent_shape_of(ae, resolution: int) -> tuple:
    from models.autoencoder import downsample_factor

    f = downsample_factor(ae)
    if resolution % f:
        raise UserError(f"dataset.resolution: {resolution} is not divisible by the AE's downsampling factor {f}")
    return (ae.config.latent_channels, resolution // f, resolution // f)


def measure_scaling(latents: torch.Tensor):
    from models.autoencoder import LatentScaling

    shift = float(latents.mean())
    std = float(latents.std())
    return LatentScaling(scale=1.0 / max(std, 1e-8), shift=shift)
