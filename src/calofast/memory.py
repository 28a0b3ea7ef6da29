"""Peak memory of this process, for the records of training, generation and evaluation."""
from __future__ import annotations

import os
import resource
import sys

__all__ = ["peak_memory", "device_memory"]


def device_memory(device) -> int:
    """Bytes of memory the device has in all: the GPU's for CUDA, else the host's physical memory."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory(device=None) -> dict:
    """This process's peaks so far, MiB: resident host memory and, on a CUDA device, the memory torch allocated."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux, bytes on macOS
    rec = {"peak_host_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device is not None and str(device).startswith("cuda"):
        import torch
        rec["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    return rec
