r"""Meta-batches across processes: a data-parallel outer loop with ``torch.distributed``.

Launched with ``torchrun`` (gloo on CPU, NCCL on GPU), every rank draws the *same*
meta-batch (same seed, same CPU generator), runs the inner loops of its contiguous share
of the T tasks, and the hypergradients are all-reduced, weighted by each rank's share, so
every rank applies the same update and holds the same φ; only rank 0 logs and writes.
The result equals a single process's up to floating-point summation order.

    torchrun --standalone --nproc_per_node=4 $(which metaloss-meta) \
        experiment=... meta.tasks_per_step=32
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from metaloss.hypergrad.base import HyperGrad, MetaBatch, MetaProblem, Params

log = logging.getLogger("metaloss")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a multi-process ``torchrun`` launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> World:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); a single
    process (no torchrun) is a world of one."""
    if not launched():
        return World()
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size())
    if joined:  # said once, however often a run asks which world it is in
        log.info("rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world


def shard_bounds(n: int, world: World) -> tuple[int, int]:
    """Rank ``r``'s contiguous slice of ``n`` tasks (sizes differ by at most one)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


class Sharded:
    """Wraps a hypergradient method: this rank's share of the tasks, then a weighted
    all-reduce, so the result is the hypergradient of the mean over all T tasks.

    Every method is linear in the per-task objectives (the mean over tasks), including ES,
    whose perturbations are drawn from the same generator on every rank."""

    def __init__(self, method, world: World) -> None:
        self.method, self.world = method, world

    def __call__(self, problem: MetaProblem, meta: Params, batch: MetaBatch) -> HyperGrad:
        n = batch.x_train.shape[0]
        lo, hi = shard_bounds(n, self.world)
        part = MetaBatch(
            {k: v[lo:hi] for k, v in batch.theta0.items()}, *(t[lo:hi] for t in batch[1:])
        )
        hg = self.method(problem, meta, part)
        weight = (hi - lo) / n
        keys = sorted(hg.grads)
        flat = (
            torch.cat([hg.loss.detach().reshape(1)] + [hg.grads[k].reshape(-1) for k in keys])
            * weight
        )
        dist.all_reduce(flat)  # sum of weighted shares = mean over all tasks
        loss, pos, grads = flat[0], 1, {}
        for k in keys:
            size = hg.grads[k].numel()
            grads[k] = flat[pos : pos + size].reshape(hg.grads[k].shape)
            pos += size
        return HyperGrad(loss, grads)

    # the wrapped method's own state (ES noise counter) is checkpointed through the wrapper
    def state_dict(self) -> dict | None:
        return self.method.state_dict() if hasattr(self.method, "state_dict") else None

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.method, "load_state_dict"):
            self.method.load_state_dict(state)


LEAVE_TIMEOUT = datetime.timedelta(minutes=5)  # ranks arrive within one outer step of each other


def leave(world: World) -> None:
    """Every rank, when the collective work is done (meta-training ended, or stopped on a
    non-finite streak every rank sees at once): wait for the others, then tear the process
    group down together. Rank 0 goes on alone (saving, selection and the meta-test need no
    peers); without this the other ranks tore their side down while rank 0 was still
    connected, and one of those teardowns in about ten aborted in gloo (SIGABRT, a CI run).
    A peer that never arrives (it died) is named in a warning after :data:`LEAVE_TIMEOUT`, and
    the group is torn down anyway: rank 0's finished work is not lost to a lost peer."""
    if not (world.size > 1 and dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=LEAVE_TIMEOUT)  # names a rank that never came
        else:
            dist.barrier()
    except RuntimeError as e:
        log.warning(
            "rank %d of %d: not every rank reached the end together (%s)", world.rank, world.size, e
        )
    dist.destroy_process_group()
    log.info("rank %d of %d: process group closed with the others", world.rank, world.size)


def finish() -> None:
    """Tear the process group down if a run left it up (a failure before :func:`leave`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
