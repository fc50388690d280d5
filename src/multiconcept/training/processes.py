"""Several processes (`accelerate launch`): the loop keeps every process's trained tensors equal itself.

The loop spreads a step's micro-batches over the processes (loop.py numbers them m·P + r), each process
accumulates the gradients of its own, and before clipping the loop averages them over the processes:
what one process accumulating all of them computes, for any job, whatever it trains. DDP would see only
the parameters of one wrapped module (Infusion's residuals and a method's token rows live outside any
module the loop could hand it) and would sync on every micro-batch; here it is one all-reduce per
optimiser step, in buckets. Under DeepSpeed or FSDP accelerate's wrapper shards and syncs the gradients
itself, so the caller prepares its module with accelerate and the loop leaves them alone.
"""

from __future__ import annotations

import torch

BUCKET = 2**24  # elements per all-reduce: 64 MB of fp32, so averaging a whole UNet's gradients needs no copy of it


def wrapper_syncs_gradients(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def loop_syncs_gradients(acc) -> bool:
    return acc.num_processes > 1 and not wrapper_syncs_gradients(acc)


def main_process_value(value):
    """The main process's `value` on every process (as is, in one process): a choice each process makes from
    its own first batch must be the one a single process makes from micro-batch 0, which is the main's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Every process starts from the main process's tensors, as DDP makes it when it wraps a model."""
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


@torch.no_grad()
def average_gradients(params: list[torch.Tensor], processes: int) -> None:
    """Each tensor's gradient becomes the mean over the processes; a process that gave it none counts as
    zero, and a tensor no process gave one keeps None (so the optimiser skips it, as in one process)."""
    import torch.distributed as dist

    given = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(given)
    live = [p for p, n in zip(params, given.tolist()) if n > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(live):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= processes
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _buckets(params: list[torch.Tensor]):
    """Runs of tensors of one gradient dtype and device, at most BUCKET elements each (a larger tensor alone)."""
    bucket, size = [], 0
    for p in params:
        if bucket and (size + p.numel() > BUCKET or p.grad.dtype != bucket[0].grad.dtype
                       or p.grad.device != bucket[0].grad.device):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
