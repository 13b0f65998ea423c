"""Real latents from manifest rows: read pre-embedded ones or encode images with the frozen AE,
sharded across processes by row index."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.core import faults
from trainer.core.errors import UserError
from trainer.core.progress import bar
from trainer.data.manifest import ImageDataset
from trainer.files.read import torch_load
from trainer.parallel.collectives import agree, gather_shards, shard_range


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
def encode_local(
    ae,
    image_paths: list,
    latent_paths: list,
    *,
    size: int,
    channels: int,
    latent_shape: tuple,
    batch_size: int,
    device,
    num_workers: int = 0,
    progress=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw (unscaled) latents for the given rows, in order: files where given, else AE means. Written
    into `out` (one row per path, on any device; a new CPU tensor by default), which is returned."""
    if out is None:
        out = torch.empty((len(image_paths), *latent_shape))
    assert tuple(out.shape) == (len(image_paths), *latent_shape), (tuple(out.shape), len(image_paths))
    todo = []
    for j, (_img, lat) in enumerate(zip(image_paths, latent_paths, strict=True)):
        if isinstance(lat, str) and lat:
            out[j] = load_latent_file(lat, latent_shape)
        else:
            todo.append(j)
    if todo:
        from models.autoencoder import encode_mean

        ds = ImageDataset([image_paths[j] for j in todo], size, channels)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, num_workers=num_workers, shuffle=False
        )
        for j, (idx, images) in enumerate(loader):
            faults.point(f"encode:{faults.phase_label()}:b{j}")
            z = encode_mean(ae, images.to(device))
            out[[todo[i] for i in idx.tolist()]] = z.to(out.device)
            if progress is not None:
                progress(len(idx))
    return out


def encode_rows(
    accelerator,
    ae,
    rows,
    *,
    size: int,
    channels: int,
    latent_shape: tuple,
    batch_size: int,
    num_workers: int = 0,
    to_all: bool = True,
) -> torch.Tensor | None:
    """Latents of every row of `rows` (a DataFrame slice), sharded across ranks, gathered in order."""
    n = len(rows)
    mine = shard_range(n, accelerator.process_index, accelerator.num_processes)
    image_paths = rows["image_path"].tolist()[mine.start : mine.stop]
    latent_paths = rows["latent_path"].tolist()[mine.start : mine.stop]
    local = encode_local(
        ae,
        image_paths,
        latent_paths,
        size=size,
        channels=channels,
        latent_shape=latent_shape,
        batch_size=batch_size,
        device=accelerator.device,
        num_workers=num_workers,
    )
    gathered = gather_shards(local.to(accelerator.device), n, to_all=to_all)
    return None if gathered is None else gathered.cpu()


def latent_shape(latent_channels: int, block_out_channels, resolution: int) -> tuple:
    """The latents an AE with these channels per level gives for images of side `resolution`."""
    f = 2 ** (len(block_out_channels) - 1)
    if resolution % f:
        raise UserError(
            f"dataset.resolution: {resolution} is not divisible by the AE's downsampling factor {f}"
        )
    return (latent_channels, resolution // f, resolution // f)


def latent_shape_of(ae, resolution: int) -> tuple:
    return latent_shape(ae.config.latent_channels, ae.config.block_out_channels, resolution)


def load_latent_set(path, n: int, shape: tuple, own: range | None = None) -> torch.Tensor:
    """A saved set of n latents (memory-mapped), checked against (n, *shape); `own`: only these rows,
    copied. Problems are one line that names the file and says how to recover."""
    try:
        full = torch_load(path, "latents")
    except UserError as e:
        raise UserError(f"{e}; delete it to regenerate") from None
    got = tuple(full.shape) if isinstance(full, torch.Tensor) else type(full).__name__
    if got != (n, *shape):
        raise UserError(f"{path}: latents of shape {got}, expected {(n, *shape)}; delete it to regenerate")
    return full if own is None else full[own.start : own.stop].clone()


def measure_scaling(latents: torch.Tensor):
    from models.autoencoder import LatentScaling

    shift = float(latents.mean())
    std = float(latents.std())
    return LatentScaling(scale=1.0 / max(std, 1e-8), shift=shift)


def load_frozen_ae(path, device):
    """The frozen autoencoder (a diffusers folder or an advdiff .pt) on `device`; errors are one line."""
    from models.autoencoder import AutoencoderLoadError, load_autoencoder

    try:
        return load_autoencoder(path).to(device)
    except AutoencoderLoadError as e:
        raise UserError(f"autoencoder.checkpoint: {e}") from None


class LatentCodec:
    """Manifest rows to model-space latents (pre-embedded files where given, else the frozen AE in fp32)
    and latents back to pixels. The AE is loaded on first use: pre-embedded latents may make it
    unnecessary. `ae_path` may be None when no AE is known (then only pre-embedded rows can be read)."""

    def __init__(
        self,
        accelerator,
        ae_path,
        scaling,
        latent_shape: tuple,
        *,
        resolution: int | None,
        batch_size: int,
        num_workers: int = 0,
    ):
        self.accelerator, self.ae_path, self.scaling = accelerator, ae_path, scaling
        self.latent_shape, self.resolution = tuple(latent_shape), resolution
        self.batch_size, self.num_workers = batch_size, num_workers
        self._ae = None

    @property
    def acc(self):
        """The old name of `accelerator`, read-only."""
        return self.accelerator

    @property
    def ae(self):
        if self._ae is None:
            if self.ae_path is None:
                raise UserError(
                    "autoencoder.checkpoint: expected an AE folder or .pt (the stage-1 checkpoint names "
                    "none), got null"
                )
            ae = load_frozen_ae(self.ae_path, self.accelerator.device)
            if ae.config.latent_channels != self.latent_shape[0]:
                raise UserError(
                    f"autoencoder.checkpoint: latent channels {ae.config.latent_channels} differ from "
                    f"the stage-1 UNet's {self.latent_shape[0]}"
                )
            self._ae = ae
        return self._ae

    def encode(self, rows, out: torch.Tensor | None = None) -> torch.Tensor:
        """Model-space latents of these rows (a DataFrame slice), written into `out` when given. A file
        that fails on one rank stops every rank with its message (no rank is left waiting): call on
        every rank."""
        return agree(self.accelerator, self._encode, rows, out)

    def _encode(self, rows, out: torch.Tensor | None) -> torch.Tensor:
        needs_ae = any(not isinstance(p, str) for p in rows["latent_path"])
        ae = self.ae if needs_ae else None
        size = self.resolution or (ae.config.sample_size if ae is not None else None)
        if ae is not None:
            shape = latent_shape_of(ae, size)
            if shape != self.latent_shape:
                raise UserError(
                    f"dataset.resolution: images give latents {shape}, the stage-1 UNet expects "
                    f"{self.latent_shape}"
                )
        progress = bar(self.accelerator, len(rows), "encoding", "image")
        raw = encode_local(
            ae,
            rows["image_path"].tolist(),
            rows["latent_path"].tolist(),
            size=size,
            channels=ae.config.in_channels if ae is not None else 0,
            latent_shape=self.latent_shape,
            batch_size=self.batch_size,
            device=self.accelerator.device,
            num_workers=self.num_workers,
            progress=progress.update,
            out=out,
        )
        progress.close()
        return self.scaling.to_model_(raw)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of model-space latents, through the frozen AE's decoder."""
        from models.autoencoder import decode

        return decode(self.ae, self.scaling.from_model(z))


def load_ae_config(path: Path) -> dict:
    """The AE's config, read from its folder (config.json + weights) or its .pt, without diffusers."""
    from models.autoencoder import AE_FORMAT

    where = "autoencoder.checkpoint"
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"{where}: {path}: not a diffusers AutoencoderKL folder (no config.json)")
        try:
            config = json.loads(cfg_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: {cfg_file}: not valid JSON ({type(e).__name__})") from None
        weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        weights = [w for w in weights if w.is_file()]
        if not weights:
            raise UserError(f"{where}: {path}: no weights (diffusion_pytorch_model.safetensors or .bin)")
        try:
            if weights[0].suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(weights[0]), framework="pt") as f:
                    list(f.keys())
            else:
                torch_load(weights[0], "AE weights")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except Exception as e:
            raise UserError(f"{where}: {weights[0]}: unreadable weights ({type(e).__name__})") from None
    elif path.is_file():
        try:
            blob = torch_load(path, "checkpoint")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not isinstance(blob, dict) or blob.get("format") != AE_FORMAT:
            raise UserError(f"{where}: {path}: not an advdiff autoencoder checkpoint (format {AE_FORMAT})")
        config = blob.get("config")
    else:
        raise UserError(f"{where}: {path}: autoencoder not found")
    needed = ("latent_channels", "block_out_channels", "sample_size", "in_channels")
    if not isinstance(config, dict) or any(k not in config for k in needed):
        raise UserError(f"{where}: {path}: its config lacks {', '.join(needed)}")
    return config
