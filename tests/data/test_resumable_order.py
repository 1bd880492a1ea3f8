"""The training order and augmentations are functions of (seed, draw), so a resumed fit draws
exactly the batches an uninterrupted fit draws."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bir.data.datamodule import RestorationDataModule, ResumableSampler
from bir.data.datasets import AUGMENT_STREAM, ImageFolderDataset
from bir.data.io import read_image, save_image
from bir.random import sample_generators


def _folder(root, n=5, size=(12, 20)):
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        save_image(torch.rand(3, *size, generator=g), root / f"im{k}.png")
    return root


def test_sampler_stream_is_one_permutation_per_pass_and_starts_anywhere():
    n, b = 7, 3
    s = ResumableSampler(n, b, seed=5)
    assert len(s) == (n // b) * b
    stream = s.draws(0, 10)  # 30 draws: passes 0..4 (the last one partly)
    for e in range(4):
        block = stream[e * n : (e + 1) * n]
        assert sorted(block) == [e * n + i for i in range(n)]  # each sample once per pass
    assert stream[:n] != stream[n : 2 * n] or stream[:n] != list(range(n))  # shuffled
    for k in (1, 2, 5, 9):  # starting at batch k continues the same stream
        assert s.draws(k, 10 - k) == stream[k * b :]
    assert ResumableSampler(n, b, seed=6).draws(0, 10) != stream  # the seed matters
    # the trainer's position decides where an iteration starts
    done = {"k": 4}
    positioned = ResumableSampler(n, b, seed=5, start_batch=lambda: done["k"])
    assert list(positioned) == stream[4 * b : 4 * b + len(s)]


def test_sampler_ranks_split_each_global_batch():
    n, b, w = 10, 2, 3
    one = ResumableSampler(n, b * w, seed=1).draws(0, 6)
    ranks = [ResumableSampler(n, b, seed=1, rank=r, world_size=w).draws(0, 6) for r in range(w)]
    for k in range(6):
        together = [d for r in range(w) for d in ranks[r][k * b : (k + 1) * b]]
        assert together == one[k * b * w : (k + 1) * b * w]
    assert len(ResumableSampler(n, b, rank=1, world_size=w)) == (n // (b * w)) * b


def test_crop_and_flip_come_from_the_draw_not_the_global_rng(tmp_path):
    root = _folder(tmp_path / "im")
    ds = ImageFolderDataset(root, crop_size=8, flip=True, vflip=True, seed=3)
    torch.manual_seed(0)
    first = ds[12]["gt"]
    torch.manual_seed(123)
    torch.rand(1000)
    assert torch.equal(ds[12]["gt"], first)
    # independent reference: the draw's generator gives top, left, then the two coins
    g = sample_generators(3, [12], "cpu", AUGMENT_STREAM)[0]
    top = int(torch.randint(0, 12 - 8 + 1, (), generator=g))
    left = int(torch.randint(0, 20 - 8 + 1, (), generator=g))
    hflip, vflip = (torch.rand(2, generator=g) < 0.5).tolist()
    ref = read_image(root / "im2.png")[:, top : top + 8, left : left + 8]  # 12 % 5 = file 2
    ref = ref.flip(-1) if hflip else ref
    ref = ref.flip(-2) if vflip else ref
    assert torch.equal(first, ref)
    # another pass over the same file (draw 12 + 5) is a fresh crop; another seed too
    other = [ds[12 + 5 * k]["gt"] for k in range(1, 6)]
    assert any(not torch.equal(o, first) for o in other)
    assert not torch.equal(
        ImageFolderDataset(root, crop_size=8, flip=True, seed=4)[12]["gt"], first
    )


class _Recorder(pl.LightningModule):
    """A one-parameter model that records, per step, the draws and a checksum of the pixels."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[int], float]] = []

    def training_step(self, batch, i):
        self.seen.append((self.global_step, batch["index"].tolist(), float(batch["gt"].sum())))
        return (self.w - batch["gt"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, tmp_path, max_steps, ckpt_path=None, every=None):
    pl.seed_everything(0, verbose=False)
    ds = ImageFolderDataset(root, crop_size=8, flip=True, seed=0)
    dm = RestorationDataModule(train=ds, batch_size=2, seed=0)
    model = _Recorder()
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ck",
        filename="s{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_top_k=-1,
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        callbacks=[ckpt] if every else [],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def test_resumed_fit_draws_the_batches_of_an_uninterrupted_fit(tmp_path):
    root = _folder(tmp_path / "im")  # 5 images, batch 2: 2 batches per epoch
    full = _fit(root, tmp_path / "a", max_steps=7, every=3)
    assert [s for s, _, _ in full] == list(range(7))
    draws = [d for _, idx, _ in full for d in idx]
    assert sorted(draws[:4]) != sorted(draws[4:8])  # epochs see different draws
    # resume mid-epoch (step 3 of 2-batch epochs) and across later epoch boundaries
    resumed = _fit(root, tmp_path / "b", max_steps=7, ckpt_path=tmp_path / "a" / "ck" / "s3.ckpt")
    assert resumed == full[3:]
