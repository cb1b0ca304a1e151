"""Where and how a run computes: device, dtype and torch's CPU threads, set once per run.

* ``device``: ``auto`` (the first GPU if there is one, else the CPU), ``cpu``, ``cuda`` or
  ``cuda:N``. Data, models, θ0, φ and the meta-test live there; random numbers for
  sampling stay on CPU generators, so a run draws the same tasks, batches and
  initialisations on every device. Saved files are always written from CPU tensors, so a
  loss meta-trained on a GPU evaluates on a CPU.
* ``dtype``: ``float32`` or ``float64`` for data, models and losses.
* ``threads``: torch's intra-op CPU threads for this process. Small models are *slower*
  with several threads on a busy machine (measured: a 10-task sine meta-test cell took
  13.4 s with 2 threads and 1.4 s with 1), and parallel sweep jobs multiply the
  oversubscription, so the default is 1 thread per run: parallelise over jobs instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from hydra.utils import instantiate

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; a named GPU must exist."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ValueError(f"device = {name!r}: must be auto, cpu, cuda or cuda:N")
    local = os.environ.get("LOCAL_RANK")  # torchrun: one GPU per local process
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{int(local)}"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device = {name!r}, but torch sees no CUDA GPU here (torch {torch.__version__}); "
                "use device=cpu or device=auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device = {name!r}, but only {torch.cuda.device_count()} GPU(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    return dev


@contextmanager
def canonical_draws() -> Iterator[None]:
    """Draw random data and initial weights in float32 whatever the run's dtype, then cast:
    a seed gives the same tasks and initialisations in a float32 and a float64 run (a float64
    draw consumes the generator differently and would give other numbers)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one CPU thread inside, the caller's count restored after: for a small network
    that must come out the same whatever the run's ``threads`` (a matmul's rounding can depend
    on how it is split), and that is fastest on one thread anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def setup(cfg) -> tuple[torch.device, torch.dtype]:
    """Apply the run's ``threads`` and ``dtype`` and return ``(device, dtype)``.

    The default dtype is set too, so tensors created inside losses and optimizers
    (constants, accumulators) match the data."""
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    dtype = DTYPES[cfg.get("dtype") or "float32"]
    torch.set_default_dtype(dtype)
    return resolve_device(cfg.get("device") or "auto"), dtype


def task_pool(cfg: Any) -> list:
    """The tasks a run trains on, as ``cfg.task`` describes them: one data set, or the
    ``meta.train_tasks`` members of a task family (seeds ``task.seed``, ``+1``, ...); made
    the same in a float32 and a float64 run."""
    with canonical_draws():
        first = instantiate(cfg.task)
        if not first.distribution:
            return [first]
        base = int(cfg.task.seed)
        return [first] + [
            instantiate(cfg.task, seed=base + i) for i in range(1, int(cfg.meta.train_tasks))
        ]
