"""Index sharding, gathering, reductions and rank agreement. Every function here except shard_range is
a collective: call it on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.core.errors import UserError


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous block of global indices owned by `rank`; blocks differ in size by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_shards(
    local: torch.Tensor, n: int, to_all: bool = True, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Reassemble exactly `n` rows, in global index order, from each rank's `shard_range` block.

    With `to_all=True` shards are padded to a common length only for transport; each rank's padding
    is cut off by its known length, so no padded duplicate ever reaches the result. With `to_all=False`
    only rank 0 receives the result (others get None), block by block at exact sizes, so non-main
    ranks never hold all n rows. Rank 0 may pass `out`, the n-row result whose first rows already
    hold its own block (`local` is then that view, nothing is copied): it then holds the result alone.
    """
    if not _dist_on():
        assert local.shape[0] == n, (local.shape, n)
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [len(shard_range(n, r, world)) for r in range(world)]
    assert local.shape[0] == sizes[rank], (local.shape, sizes, rank)
    if not to_all:
        # point to point, exact sizes, no padding: rank 0 receives every block straight into its row range
        # of one preallocated result (peak: the result, + its own block unless it was made inside `out`)
        if rank != 0:
            if sizes[rank]:
                dist.send(local.contiguous(), dst=0)
            return None
        if out is None:
            out = local.new_empty((n, *local.shape[1:]))
            out[: sizes[0]] = local
        else:
            assert out.shape == (n, *local.shape[1:]) and out.is_contiguous(), (out.shape, n)
            if local.data_ptr() != out.data_ptr():
                out[: sizes[0]] = local
        start = sizes[0]
        for r in range(1, world):
            if sizes[r]:
                dist.recv(out[start : start + sizes[r]], src=r)
            start += sizes[r]
        return out
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _dist_on():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if _dist_on():
        dist.barrier()


def agree(accelerator, fn, *args, **kwargs):
    """Run fn on every rank; if it raises a UserError on any rank, raise the first rank's message on
    all of them (a problem seen by one rank must not leave the others waiting in a collective)."""
    message, result = None, None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        message = str(e)
    if accelerator.num_processes > 1:
        messages = [None] * accelerator.num_processes
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m is not None), None)
    if message is not None:
        raise UserError(message)
    return result


class Totals:
    """Named float64 running sums on `device`, summed over ranks in one collective by `reduced()`."""

    def __init__(self, names, device):
        self.index = {name: i for i, name in enumerate(names)}
        self.values = torch.zeros(len(self.index), dtype=torch.float64, device=device)

    def add(self, name: str, value) -> None:
        self.values[self.index[name]] += value

    def reduced(self) -> dict:
        """{name: total over every rank} (a collective: call on every rank)."""
        return dict(zip(self.index, all_reduce_sum(self.values).tolist(), strict=True))
