"""Everything distributed in one place: process-group setup from torchrun's environment, DDP or FSDP2
wrapping, and the few collectives the trainer needs. Single-process runs go through the same calls as no-ops.

Launch: ``torchrun --nproc-per-node N -m tympan train recipe.yaml`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Context", "setup", "teardown", "wrap_model", "unwrap", "all_reduce_mean", "gather_objects",
           "full_state_dict", "load_full_state_dict"]  # fmt: skip


@dataclass(frozen=True)
class Context:
    """Where this process stands: world size, rank, local rank, device, and whether it leads (rank 0)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(backend: str | None = None) -> Context:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``); one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Context(world_size, rank, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def wrap_model(model: nn.Module, ctx: Context, fsdp: bool = False) -> nn.Module:
    """DDP over ranks, or FSDP2 (``fully_shard`` on every block of the model's declared ``block_types``, then the
    root) for models too big to replicate (Dasheng 0.6B/1.2B); every family declares its blocks in the registry
    (transformer blocks, DASS VSS blocks, SSAM Mamba blocks, encoder and decoder blocks of MAE)."""
    if not ctx.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from tympan.models.protocol import audio_model

        for block in audio_model(model).block_modules():
            fully_shard(block)
        return fully_shard(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so the model is itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def all_reduce_mean(value: Tensor, ctx: Context) -> Tensor:
    """Mean of a tensor over ranks (a copy; itself in one process)."""
    value = value.detach().clone()
    if ctx.distributed:
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def all_reduce_sum(value: Tensor, ctx: Context) -> Tensor:
    value = value.detach().clone()
    if ctx.distributed:
        dist.all_reduce(value)
    return value


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in one process)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimiser) state on CPU: collective under FSDP (every rank must call it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer is None:
            return get_model_state_dict(model, options=options), None
        return get_state_dict(model, optimizer, options=options)
    module = unwrap(model)
    return module.state_dict(), (optimizer.state_dict() if optimizer is not None else None)


def load_full_state_dict(model: nn.Module, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
                         optimizer_state: dict | None = None) -> None:  # fmt: skip
    """Inverse of :func:`full_state_dict` (every rank passes the full state)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        if optimizer is None or optimizer_state is None:
            set_model_state_dict(model, model_state, options=options)
        else:
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                           options=options)  # fmt: skip
        return
    unwrap(model).load_state_dict(model_state)
    if optimizer is not None and optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
