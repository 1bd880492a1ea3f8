"""The LightningDataModule that wires datasets from config into loaders."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from bir.data.datasets import collate


class RestorationDataModule(pl.LightningDataModule):
    """Loaders for already-instantiated datasets (Hydra builds them from ``conf/data/*``).

    Args:
        train / val / test / predict: datasets (any may be None).
        batch_size: per-device training batch size (total = batch_size x devices x accumulation).
        val_batch_size: per-device evaluation batch size (1 for images of different sizes).
        num_workers: loader worker processes (0 runs in the main process).
        pin_memory: pin host memory for faster host-to-GPU copies.
        persistent_workers: keep workers alive between epochs (needs num_workers > 0).
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
    ):
        super().__init__()
        self.datasets = {"train": train, "val": val, "test": test, "predict": predict}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0

    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False):
        ds = self.datasets[split]
        if ds is None:
            raise ValueError(f"no {split} dataset configured (set data.{split})")
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=drop_last,
            collate_fn=collate,
        )

    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        if self.datasets["val"] is None:
            return []
        return self._loader("val", self.val_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.val_batch_size, shuffle=False)

    def predict_dataloader(self):
        return self._loader("predict", self.val_batch_size, shuffle=False)
