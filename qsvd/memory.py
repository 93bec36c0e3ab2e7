"""Memory: peaks to report, free memory to plan with, freed heap handed back to the OS, and the
live tensor bytes of a CPU run counted as a GPU's allocator counts them (benchmarks and tests)."""

import ctypes
import gc
import os
import resource
import sys
import weakref

import bitsandbytes.functional as bnbF
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _load_libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


LIBC = _load_libc()


def return_freed_memory(collect: bool = False) -> None:
    """Hand freed heap memory back to the OS. glibc keeps it otherwise, and the fp32 copies of
    successive layers fragment the heap until the RSS reaches the size of the fp32 model.
    `collect` first frees unreachable reference cycles (a full gc pass: not for every layer)."""
    if collect:
        gc.collect()
        if torch.cuda.is_initialized():  # the split's freed blocks, from torch's cache to the driver
            torch.cuda.empty_cache()
    if LIBC is not None:
        LIBC.malloc_trim(0)


def status_mb(field: str, path: str = "/proc/self/status") -> float:
    """A kB field of /proc/self/status (VmRSS, VmHWM) or /proc/meminfo (MemTotal), in MiB."""
    with open(path) as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def paged_bytes() -> int:
    """bitsandbytes' paged optimizer state: CUDA managed memory, which torch's allocator never sees
    (bitsandbytes wraps it with `torch.frombuffer`)."""
    return sum(t.numel() * t.element_size() for t in bnbF.GlobalPageManager.get_instance().paged_tensors)


def peak_memory_mb(device: torch.device) -> float:
    """On CUDA, the most GPU memory torch's allocator has held (allocated tensors, cuBLAS's
    workspaces, which it allocates too, and the blocks it keeps cached or split) plus the paged
    optimizer state; the process's peak RSS on CPU.

    On Linux the peak RSS is VmHWM: getrusage's ru_maxrss survives fork + exec, so a child of
    a big process would report its parent's peak.
    """
    if device.type == "cuda":
        return (torch.cuda.max_memory_reserved(device) + paged_bytes()) / 2**20
    try:
        return status_mb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's allocator statistics on CUDA; VmHWM via /proc/self/clear_refs on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # elsewhere the peak stays the process's


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the gradients will live: the GPU's, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable")) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def group_by_size(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive names whose sizes fit in `budget` together; one larger than it goes alone."""
    groups, used = [[]], 0
    for name, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


class LiveTensors(TorchDispatchMode):
    """The bytes of tensor storage alive now and at most, from `alive` bytes at the start: each
    storage an op makes counts from then until it is freed."""

    def __init__(self, alive: int):
        super().__init__()
        self.now = self.peak = alive
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.sizes:
                storage = tensor.untyped_storage()
                self.sizes[storage.data_ptr()] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self.free, storage.data_ptr())
        return out

    def free(self, key: int) -> None:
        self.now -= self.sizes.pop(key)


def count_live_tensors_in_training() -> dict:
    """Wrap `Trainer.train` in `LiveTensors`, from the model's parameters and buffers; the dict
    it returns gets the peak, in MB, once training is done."""
    from transformers import Trainer

    figures, train = {}, Trainer.train

    def counted_train(trainer, *args, **kwargs):
        tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
        alive = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        with LiveTensors(alive) as live:
            result = train(trainer, *args, **kwargs)
        figures["tensor_peak_mb"] = live.peak / 2**20
        return result

    Trainer.train = counted_train
    return figures
