"""torch.distributed for ``torchrun``: process group, image shards, counts brought together.

``torchrun --nproc-per-node N -m ovseg_bench run ...`` (several nodes: torchrun's own
``--nnodes``, ``--node-rank``, ``--rdzv-*`` flags) starts N copies of the run with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. With ``WORLD_SIZE > 1`` each copy joins the process group
(NCCL on ``cuda:LOCAL_RANK`` when the device is CUDA, gloo on the CPU), evaluates its shard with
the same loop, and the counts are brought together:

* **Shard rule.** The listing is cut into blocks of ``save_every`` images (25 by default,
  ``$OVSEG_SAVE_EVERY``): block j holds listing positions ``[j*B, (j+1)*B)`` and goes to rank
  ``j mod WORLD_SIZE``. The runner never batches windows across a block boundary, so every
  forward pass is one that a single-process run makes too: the numbers are bit-identical to it
  whatever the batch size and the device's kernels (runner.py).
* **Bringing together.** The counts' int64 additive tensors (the confusion matrices of the
  semantic track) are summed with ``all_reduce`` (exact); the per-item counts, ids and skipped
  items are all-gathered and put back in listing order, so every rank holds the whole
  dataset's evaluation (and fails alike when nothing was scored).
  Only rank 0 writes result files and prints; the other ranks run without progress bars.

This module only talks to torch.distributed; what an evaluation holds is runner.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import ConfigError
from .metrics import counts_from_state
from .runner import Evaluation


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the run: a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def ranks_from_env(environ: Mapping[str, str] = os.environ) -> Ranks:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them; unset = a single process."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = environ.get(name, "").strip()
        try:
            values[name] = int(raw) if raw else default
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer; "
                              "start distributed runs with torchrun, which sets it") from None
    ranks = Ranks(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise ConfigError(f"RANK={ranks.rank}, WORLD_SIZE={ranks.world_size}, LOCAL_RANK={ranks.local_rank} "
                          "do not describe a process group; start distributed runs with torchrun")
    return ranks


def init(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group when ``WORLD_SIZE > 1``; returns this rank's place and device.

    A CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process) with the NCCL backend; the
    CPU uses gloo. A process group the caller already started is used as it is.
    """
    ranks = ranks_from_env()
    if not ranks.active:
        return ranks, device
    dist = torch.distributed
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={ranks.world_size} asks for a distributed run, but this torch build "
                          "has no torch.distributed; install a torch with it or run one process")
    backend = "gloo"
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if ranks.local_rank >= visible:
            raise ConfigError(f"rank {ranks.rank} has LOCAL_RANK {ranks.local_rank} but {visible} CUDA device(s) "
                              f"are visible; start at most {visible} process(es) per node (--nproc-per-node)")
        device, backend = torch.device("cuda", ranks.local_rank), "nccl"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return ranks, device


def shutdown(ranks: Ranks) -> None:
    if ranks.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block first (weights download into the shared cache), then the others."""
    if not ranks.main:
        ranks.barrier()
    yield
    if ranks.main:
        ranks.barrier()


def shard(num_images: int, block: int, ranks: Ranks) -> tuple[int, ...]:
    """Listing positions of this rank: whole blocks of ``block`` images, block j to rank j mod world."""
    return tuple(i for i in range(num_images) if (i // block) % ranks.world_size == ranks.rank)


def sum_over_ranks(values: Mapping[str, int], ranks: Ranks) -> dict[str, int]:
    """Integer tallies (forward passes) summed over every rank; a single process's unchanged."""
    if not ranks.active:
        return dict(values)
    parts: list[Any] = [None] * ranks.world_size
    torch.distributed.all_gather_object(parts, dict(values))
    return {key: sum(int(part[key]) for part in parts) for key in values}


def combine(part: Evaluation, ranks: Ranks) -> Evaluation:
    """The whole dataset's evaluation from every rank's part, on every rank, in listing order.

    The counts' additive tensor (:class:`~ovseg_bench.engine.metrics.Counts`) is summed with
    all_reduce (int64, exact); the rest is all-gathered. Time is the slowest rank's. A single
    process gets ``part`` back unchanged. Works for every track's counts alike.
    """
    if not ranks.active:
        return part
    additive = part.counts.additive().clone()
    torch.distributed.all_reduce(additive)
    state = part.state_dict()
    parts: list[Any] = [None] * ranks.world_size
    torch.distributed.all_gather_object(parts, state)
    return merge_states(parts, additive)


def merge_states(parts: list[dict[str, Any]], additive: torch.Tensor) -> Evaluation:
    """One evaluation from the :meth:`Evaluation.state_dict` of disjoint shards and their summed
    additive counts; rows, ids and skipped items sorted by listing position."""
    scored_at = [at for p in parts for at in p["scored_at"]]
    order = sorted(range(len(scored_at)), key=scored_at.__getitem__)
    rows = torch.cat([p["counts"]["per_item"] for p in parts])[order]
    ids = [i for p in parts for i in p["image_ids"]]
    skipped_at = [at for p in parts for at in p["skipped_at"]]
    skip_order = sorted(range(len(skipped_at)), key=skipped_at.__getitem__)
    skipped = [s for p in parts for s in p["skipped"]]
    processed = sorted(zip(scored_at + skipped_at, ids + [s["image_id"] for s in skipped]))
    merged = {**parts[0]["counts"], "num_items": len(order), "additive": additive.cpu(), "per_item": rows}
    counts = counts_from_state(merged, additive.device)
    if not counts.rows_agree():
        # The per-item rows and the reduced counts come from the same items: a bug if not.
        raise RuntimeError("all-reduced counts differ from the sum of the gathered per-item counts")
    return Evaluation(counts, [ids[k] for k in order], [skipped[k] for k in skip_order],
                      sum(int(p["num_windows"]) for p in parts), max(float(p["seconds"]) for p in parts),
                      [scored_at[k] for k in order], [skipped_at[k] for k in skip_order],
                      [image_id for _, image_id in processed],
                      sorted((u for p in parts for u in p.get("unanswered", [])), key=lambda u: u["at"]))
