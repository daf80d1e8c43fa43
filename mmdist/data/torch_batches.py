"""Ray Data -> torch batches: how every mmdist consumer iterates a Ray Dataset or a train shard.

    for batch in iter_torch(shard, batch_size=32, drop_last=True):
        ...  # dict of CPU torch tensors, the batch contract of schema.py; the consumer moves it

Two choices differ from ``iter_torch_batches``' defaults (what they were measured to change
with ``mmdist bench ingest``: ``docs/performance.md``):

* numpy batches wrapped by :func:`~mmdist.data.schema.as_tensors`. ``iter_torch_batches``
  converts each batch column by column on a pool of 4 threads (``DefaultCollateFn``); on a
  2-core node the hand-offs cost more than the conversions, which are zero-copy views of the
  block. Every column of the batch contract is a fixed-size numeric array, so a batch is its
  numpy views wrapped by ``torch.from_numpy``. It also imports torch with the first batch, not
  when iteration starts, so a Ray Train worker's shard streams before the worker has loaded
  torch (``mmdist.train.entry``).
* ``prefetch_batches=0`` when the cluster has one node. Prefetching asks Ray to pull blocks
  from other nodes ahead of use; on one node every block is already local, and the prefetch
  window holds each block back until the next one exists, so the first batch of every epoch
  would wait for a second block. With more nodes, 2 batches are prefetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mmdist.data import ray_scheduling
from mmdist.data.schema import as_tensors

if TYPE_CHECKING:  # torch loads with the first batch: a worker asks for its shard first
    import torch

# Batches prefetched when blocks can live on other nodes (Ray's default is 1).
PREFETCH_BATCHES_MULTI_NODE = 2


def prefetch_batches() -> int:
    """Batches to prefetch: 0 on a one-node cluster, Ray's default otherwise (see the module)."""
    return 0 if ray_scheduling.one_node() else PREFETCH_BATCHES_MULTI_NODE


def iter_torch(ds: Any, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of CPU tensors from a Dataset or a DataIterator (a Ray Train dataset shard):
    ``ds.iter_batches(batch_format="numpy", prefetch_batches=..., **kwargs)``, each wrapped by
    :func:`~mmdist.data.schema.as_tensors`; ``kwargs`` may set ``prefetch_batches``
    themselves."""
    kwargs.setdefault("prefetch_batches", prefetch_batches())
    return (as_tensors(b) for b in ds.iter_batches(batch_format="numpy", **kwargs))


class FirstBatchAhead:
    """An iterator whose first item is pulled at once in a background thread.

    A fresh run's first epoch starts streaming while the DeepSpeed engine is built: Ray Data
    starts the split's coordinator, its read tasks and their workers on the first request, and
    those seconds then overlap the engine's instead of following them (the ``first_step`` phase
    of ``mmdist train``'s start-up). Iterating waits for that first item and re-raises what the
    thread raised, then continues the same iterator: the items and their order are the
    iterator's own.
    """

    def __init__(self, it: Any):
        import threading

        self._it = iter(it)
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, name="mmdist-first-batch",
                                        daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as e:  # handed to the consumer, in its own thread
            self._error = e

    def __iter__(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        self._first = []
        yield from self._it
