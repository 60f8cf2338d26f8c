"""Where a run executes: its processes (torchrun), device, numeric precision and determinism.

One process per device, launched by `torchrun`: each reads RANK, LOCAL_RANK
and WORLD_SIZE from its environment and joins the process group (NCCL on
GPUs, gloo on CPU). With none of those variables set, a run is one process
and every helper here is a no-op, so single-process code paths are exactly
the distributed ones with world_size 1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from .errors import UsageError, VisiontuneError, env_world

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

T = TypeVar("T")


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast with a gradient scaler)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    # ----- collectives (identity with one process) -----

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, in float64 so that sums of per-sample losses stay exact."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        # NCCL reduces device tensors only; gloo reduces CPU tensors.
        buffer = values.to(self._collective_device(), torch.float64 if values.is_floating_point() else values.dtype)
        dist.all_reduce(buffer)
        return buffer.to(values.device)

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only (file system work) and hand its result, or its user-facing error, to
        every rank, so that all ranks go on or stop together with the same message."""
        if not self.distributed:
            return fn()
        outcome: tuple = (None, None)
        if self.is_main:
            try:
                outcome = (fn(), None)
            except VisiontuneError as exc:
                outcome = (None, exc)
        result, error = self.broadcast(outcome)
        if error is not None:
            raise error
        return result

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP sends them before each
        forward, so after an epoch's last step every other rank still holds statistics updated by its
        own last batch; evaluating or saving those would not be the model rank 0 saves."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every world_size-th one, starting at rank (no padding, so no
        sample is counted twice when per-rank sums are added up)."""
        return list(items[self.rank :: self.world_size])

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


class ShardSampler(torch.utils.data.Sampler):
    """Training order for one rank: the global order drawn by `base` (identical on every rank, since all
    ranks draw it from the same seeded generator, which advances every epoch: the job
    DistributedSampler's set_epoch does), padded by repeating its start to a multiple of the world
    size, then every world_size-th index. All ranks get the same number of batches, which DDP needs.
    With one process it is `base` unchanged."""

    def __init__(self, base: torch.utils.data.Sampler, rank: int, world_size: int):
        self.base, self.rank, self.world_size = base, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.base) // self.world_size)

    def __iter__(self):
        order = list(self.base)
        if self.world_size == 1:
            return iter(order)
        order += order[: (-len(order)) % self.world_size]
        return iter(order[self.rank :: self.world_size])


def start(device: str = "auto", precision: str = "auto", deterministic: bool = False) -> Runtime:
    """Resolve the device and precision, and join torchrun's process group when launched by it."""
    rank, local_rank, world = env_world()
    resolved_device = resolve_device(device, local_rank)
    resolved_precision = resolve_precision(precision, resolved_device)
    if deterministic:
        enable_determinism()
    elif resolved_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    if resolved_device.type == "cuda":
        # --precision fp32 means fp32: by default PyTorch lets cuDNN convolutions round through TF32
        # (a 10-bit mantissa), which a CPU re-evaluation of the saved weights would not reproduce.
        torch.backends.cudnn.allow_tf32 = resolved_precision != "fp32"
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if resolved_device.type == "cuda":
                torch.cuda.set_device(resolved_device)
            dist.init_process_group("nccl" if resolved_device.type == "cuda" else "gloo")
            atexit.register(_leave_group)
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=resolved_device,
                   precision=resolved_precision)


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    flag = (flag or "auto").strip().lower()
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cpu":
        return torch.device("cpu")
    if flag == "cuda" or flag.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {flag}: no CUDA GPU is visible to PyTorch here; use --device cpu or auto.")
        if flag == "cuda":  # torchrun: one process per GPU, chosen by LOCAL_RANK
            index = local_rank % torch.cuda.device_count()
        else:
            try:
                index = int(flag.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {flag}: is not one of {DEVICE_CHOICES}.") from None
            if not 0 <= index < torch.cuda.device_count():
                raise UsageError(f"--device {flag}: this machine has {torch.cuda.device_count()} GPU(s), "
                                 f"numbered from 0; pick one of them.")
        return torch.device("cuda", index)
    raise UsageError(f"--device {flag}: is not one of {DEVICE_CHOICES}.")


def resolve_precision(flag: str, device: torch.device) -> str:
    flag = (flag or "auto").lower()
    if flag not in PRECISIONS:
        raise UsageError(f"--precision {flag}: is not one of {', '.join(PRECISIONS)}.")
    if flag == "auto":
        # bf16 where the GPU computes it natively (Ampere and later); on CPUs fp32 is the fast path.
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if flag == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16: needs a CUDA GPU; use bf16 or fp32 on the CPU.")
    return flag


def enable_determinism() -> None:
    """Same seed, same numbers on a GPU too: deterministic kernels everywhere (an error if an op has
    none), cuBLAS with a fixed workspace, cuDNN without autotuning. Costs speed (docs/mechanics.md)."""
    # cuBLAS reads this when its first handle is created, so it must be set before any GPU matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def seed_everything(seed: int) -> torch.Generator:
    """Seed the global generators (model init, augmentation, dropout, mixing) and return the run's own
    generator, which orders the data."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """After the model is built (identically on every rank), ranks after 0 reseed the global generators
    so that their augmentations differ; rank 0 goes on as a single-process run would."""
    if rank > 0:
        rank_seed = seed + 7919 * rank
        random.seed(rank_seed)
        np.random.seed(rank_seed % (1 << 32))
        torch.manual_seed(rank_seed)
