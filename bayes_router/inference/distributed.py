"""Devices and data-parallel training on PyTorch's own engine (``torch.distributed``).

:func:`resolve_device` turns ``auto | cpu | cuda | cuda:N | mps`` into a ``torch.device`` (a
clear error when it is not there). :class:`Distributed` describes the process group a run
trains in: started by ``torchrun`` (its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and rendezvous
variables), gloo on CPU and NCCL on CUDA. Data parallelism is a gradient all-reduce, the
equivalent of wrapping the objective in ``DistributedDataParallel``: every rank computes the
objective on its shard of the global batch, the gradients (and the loss, so that every rank takes
the same decisions) are averaged, and every rank applies the same update to identical
parameters. Because each shard's loss is an unbiased estimate of the whole-data ELBO (the
``batch`` plate scales it by ``dataset_size / shard size``), their average is the global batch's
estimate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names; ``auto`` is CUDA when available (the process's
    ``LOCAL_RANK`` under torchrun), else the CPU.

    :raises ValueError: for an unknown name or a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device 'mps': no Apple-silicon GPU is available on this machine")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        index = spec.partition(":")[2]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has CUDA devices 0.."
                             f"{torch.cuda.device_count() - 1}")
        return torch.device("cuda", int(index))
    raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {spec!r}")


@dataclass(frozen=True)
class Distributed:
    """The process group of a run: ``rank`` of ``world_size`` processes (one of one when not
    distributed)."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where the group's collectives put their tensors (CUDA for NCCL)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, history and reports."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        """Join the process group ``torchrun`` describes (``WORLD_SIZE > 1``), creating it if
        needed: NCCL for a CUDA device, gloo otherwise. One process: a group of one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), str(device))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":  # NCCL's collectives run on the current device: this rank's
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
        return cls(dist.get_rank(), dist.get_world_size(), str(device))

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks (itself in one process)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def _mean_of(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """The ranks' mean of each tensor, by one flat all-reduce in ``dtype`` (views of one
        buffer; the ranks must pass tensors of the same shapes in the same order)."""
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        parts = flat.split([t.numel() for t in tensors])
        return [part.view_as(t) for part, t in zip(parts, tensors, strict=True)]

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace every gradient by its mean over the ranks (one flat all-reduce). A
        parameter without a gradient on this rank counts as zero in the mean; one without a
        gradient on every rank keeps none (as on one process, so the optimiser skips it)."""
        params = [p for p in params if p.requires_grad]
        if not self.active or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype,
                           device=grads[0].device)
        *means, anywhere = self._mean_of(grads + [has], grads[0].dtype)
        for p, mean, somewhere in zip(params, means, (anywhere > 0).tolist(), strict=True):
            p.grad = mean.clone() if somewhere else None

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace every tensor, in place, by its mean over the ranks (one flat all-reduce in
        float64; the ranks must pass tensors of the same shapes in the same order)."""
        if not self.active or not tensors:
            return
        for t, mean in zip(tensors, self._mean_of(tensors, torch.float64), strict=True):
            t.copy_(mean)

    def check_same(self, text: str, what: str) -> None:
        """Refuse to go on if ``text`` (e.g. a configuration as JSON) differs between ranks."""
        if not self.active:
            return
        gathered: list[str | None] = [None] * self.world_size
        dist.all_gather_object(gathered, text)
        differ = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
        if differ:
            raise ValueError(f"{what} differs between ranks: ranks {differ} disagree with rank "
                             f"0; start every process with the same arguments")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agree(self, failed: BaseException | None, what: str) -> None:
        """Share whether a rank failed at ``what`` (rank 0's checkpoint or evaluation): every
        rank raises together instead of the others waiting on one that has gone. The failing
        rank re-raises its own error; the others a ``RuntimeError`` naming it."""
        if not self.active:
            if failed is not None:
                raise failed
            return
        flag = torch.tensor([0.0 if failed is None else 1.0], device=self.device)
        dist.all_reduce(flag)
        if failed is not None:
            raise failed
        if float(flag) > 0:
            raise RuntimeError(f"another rank failed at {what}; see its message")


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of a global batch (the leading axis).

    :raises ValueError: if ``world_size`` does not divide the batch.
    """
    if batch.shape[0] % world_size:
        raise ValueError(f"the world size {world_size} must divide batch_size "
                         f"{batch.shape[0]}: every process takes an equal share of each batch")
    size = batch.shape[0] // world_size
    return batch[rank * size:(rank + 1) * size]


def shard_seed(seed: int, step: int, shard_index: int) -> int:
    """The RNG seed of one shard of one step's global batch: the same shard gets the same
    noise whether it is a process of its own or a micro-batch of one process."""
    return hash((int(seed), int(step), int(shard_index))) % (2 ** 63)
