"""The LightningDataModule that wires datasets from config into loaders, and the resumable
training order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bir.data.datasets import collate
from bir.random import sample_seed

#: generator stream (bir.random) of the training order's permutations
ORDER_STREAM = 52


class ResumableSampler(DistributedSampler):
    """The training order as one endless stream of shuffled passes, positioned by the trainer.

    Stream position ``p = 0, 1, 2, ...`` holds the draw ``v = e * n + perm_e[p mod n]`` with
    ``e = p // n`` (the pass) and ``perm_e`` a permutation of ``range(n)`` drawn from a generator
    seeded by ``(seed, e)``: every sample appears once per pass, and ``v`` numbers the draw (the
    dataset takes ``v mod n`` as the sample and seeds its crop and flips from ``v``). Global batch
    ``k`` (all ranks together) is positions ``[k B W, (k + 1) B W)`` for batch size ``B`` and
    ``W`` ranks; rank ``r`` takes ``[k B W + r B, k B W + (r + 1) B)``.

    Each iteration starts at the batch ``start_batch()`` returns: the trainer's count of batches
    done. So a run resumed from a checkpoint draws the same batches as the uninterrupted run,
    whatever Lightning's epoch bookkeeping does on restart, and an iteration's order never depends
    on the global RNG or on how many batches a loader's workers prefetched. An iteration yields one
    epoch, ``max(1, n // (B W))`` batches (Lightning stops a resumed epoch early itself).

    It subclasses :class:`~torch.utils.data.DistributedSampler` only so that Lightning keeps it
    under DDP instead of wrapping it; the rank split above is its own.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: Callable[[], int] | None = None,
    ):
        if n <= 0:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        # no DistributedSampler.__init__: it asks torch.distributed for the rank at construction
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.num_replicas = int(rank), int(world_size)
        self.start_batch = start_batch or (lambda: 0)
        self.epoch = 0  # set by Lightning (set_epoch); the order does not use it
        self.shuffle, self.drop_last = True, True  # what Lightning reads off a DistributedSampler
        self.batches_per_epoch = max(1, self.n // (self.batch_size * self.num_replicas))

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def _pass(self, e: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(sample_seed(self.seed, e, ORDER_STREAM))
        return torch.randperm(self.n, generator=g) + e * self.n

    def draws(self, first_batch: int, batches: int) -> list[int]:
        """This rank's draws for global batches ``first_batch .. first_batch + batches - 1``."""
        b, w = self.batch_size, self.num_replicas
        out: list[int] = []
        cache: dict[int, torch.Tensor] = {}
        for k in range(first_batch, first_batch + batches):
            start = k * b * w + self.rank * b
            for p in range(start, start + b):
                e = p // self.n
                if e not in cache:
                    cache = {e: self._pass(e)}  # positions only move forward: keep one pass
                out.append(int(cache[e][p % self.n]))
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.draws(int(self.start_batch()), self.batches_per_epoch))


class RestorationDataModule(pl.LightningDataModule):
    """Loaders for already-instantiated datasets (Hydra builds them from ``conf/data/*``).

    The training loader draws in the order of a :class:`ResumableSampler` seeded by ``seed``
    and positioned at the trainer's count of batches done, so training resumed from a
    checkpoint sees exactly the batches an uninterrupted run sees (together with the datasets'
    per-draw crops and the training modules' per-step degradation seeds).

    Args:
        train / val / test / predict: datasets (any may be None).
        batch_size: per-device training batch size (total = batch_size x devices x accumulation).
        val_batch_size: per-device evaluation batch size (1 for images of different sizes).
        num_workers: loader worker processes (0 runs in the main process).
        pin_memory: pin host memory for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (needs num_workers > 0).
        seed: seed of the training order (the entry config's ``seed``).
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        predict: Dataset | None = None,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.datasets = {"train": train, "val": val, "test": test, "predict": predict}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed

    def _dataset(self, split: str) -> Dataset:
        ds = self.datasets[split]
        if ds is None:
            raise ValueError(f"no {split} dataset configured (set data.{split})")
        return ds

    def _loader(self, ds: Dataset, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
            **kwargs,
        )

    def _batches_done(self) -> int:
        """Training batches the attached trainer has completed (restored from a checkpoint on
        resume); 0 without a trainer."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.fit_loop.total_batch_idx + 1

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        trainer = self.trainer
        sampler = ResumableSampler(
            len(ds),
            self.batch_size,
            seed=self.seed,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            start_batch=self._batches_done,
        )
        return self._loader(ds, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self):
        if self.datasets["val"] is None:
            return []
        return self._loader(self._dataset("val"), self.val_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader(self._dataset("test"), self.val_batch_size, shuffle=False)

    def predict_dataloader(self):
        return self._loader(self._dataset("predict"), self.val_batch_size, shuffle=False)
