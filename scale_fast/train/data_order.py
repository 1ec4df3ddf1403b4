"""Which samples each step reads (DataOrder), and the batches collated ahead in a thread (Prefetcher)."""
from __future__ import annotations

import queue
import threading
from typing import List

import numpy as np
from torch.utils.data import Subset

from ..data.batch import collate
from ..model.config import SCALEConfig


class DataOrder:
    """Which dataset indices step s reads: a stream of per-epoch permutations (or 0, 1, 2, ...
    without shuffling), cut into consecutive batches; position = samples already read.

    shard=(rank, world): this rank reads its contiguous share of each (global) batch."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, shard=(0, 1)):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = shard
        self._epoch, self._perm = -1, None

    def _index(self, p: int) -> int:
        epoch, k = divmod(p, self.n)
        if not self.shuffle:
            return k
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[k])

    def indices(self, position: int) -> List[int]:
        lo = position + self.rank * self.batch_size // self.world
        hi = position + (self.rank + 1) * self.batch_size // self.world
        return [self._index(p) for p in range(lo, hi)]


class Prefetcher:
    """Collates the batches of steps start, start+1, ... in a background thread (a few ahead);
    next() -> (batch, its dataset indices).  features=False: batches without their feature rows
    (the cached step reads each micro-batch's again from the dataset)."""

    def __init__(self, dataset, order: DataOrder, config: SCALEConfig, start_position: int, depth: int = 3,
                 features: bool = True):
        self.dataset, self.order, self.config, self.features = dataset, order, config, features
        self.queue: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
        self.position = start_position
        self._stop = threading.Event()
        self.thread = None
        if depth > 0:  # depth 0: collate in the caller's thread (no batch held ahead)
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def collate(self, position: int):
        # samples read one at a time into the batch's buffers (no list of samples held)
        indices = self.order.indices(position)
        return collate(Subset(self.dataset, indices), self.config, features=self.features), indices

    def _run(self):
        position = self.position
        try:
            while not self._stop.is_set():
                batch = self.collate(position)
                position += self.order.batch_size  # the global batch (all ranks' shards)
                while not self._stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the training thread
            self.queue.put(e)

    def next(self):
        if self.thread is None:
            batch = self.collate(self.position)
            self.position += self.order.batch_size
            return batch
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
