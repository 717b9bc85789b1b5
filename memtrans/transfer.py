"""Copies between the model's device and the host that never make the model's thread wait.

The kNN memory works on host arrays while the model runs on its device. On CUDA a plain
``.cpu()``, ``.numpy()`` or ``.to(device)`` from pageable memory waits for the GPU stream, which
would stall the model's thread (and so the queue of kernels it feeds the GPU) at every memorizing
layer. Instead:

- device to host (``to_host``): a ``non_blocking`` copy into a pinned host buffer and a CUDA
  event recorded after it on the current stream; the memory's own thread waits for the event
  (``HostCopy.numpy``) before it reads the buffer.
- host to device: the memory's thread copies results into pinned buffers (``pin_for``), and the
  model's thread issues ``non_blocking`` copies of them (``to_device``). Torch's pinned-memory
  allocator keeps a buffer until the copies that read it are done.

On CPU every step is a no-op (a host copy is the tensor itself, nothing is pinned), so a CPU run
goes through the same calls as a CUDA one minus pinning and events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class HostCopy:
    """A tensor on the host; on CUDA a pinned buffer being filled until ``event`` completes."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None

    def numpy(self) -> np.ndarray:
        """The host array once the copy is done. It waits for the GPU: call it on the memory's
        thread, never the model's."""
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.numpy()


def to_host(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> HostCopy:
    """``tensor`` (detached, as ``dtype``) on its way to the host, without waiting for it.

    CPU: the tensor itself (no copy when it has ``dtype`` already). CUDA: a pinned buffer filled
    by a ``non_blocking`` copy, with a blocking-sync event (its waiter sleeps instead of spinning
    on a core the kNN search needs) recorded after the copy.
    """
    tensor = tensor.detach().to(dtype)
    if tensor.device.type == "cpu":
        return HostCopy(tensor, None)
    if tensor.device.type != "cuda":
        raise ValueError(f"kNN memory takes tensors on the CPU or a CUDA device, got one on "
                         f"{tensor.device}")
    host = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
    host.copy_(tensor.contiguous(), non_blocking=True)
    event = torch.cuda.Event(blocking=True)
    event.record(torch.cuda.current_stream(tensor.device))
    return HostCopy(host, event)


def pin_for(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor ready for a non-blocking copy to ``device``: pinned for CUDA, else itself."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (from ``pin_for``) on ``device``, copied ``non_blocking``; itself on the CPU."""
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)
