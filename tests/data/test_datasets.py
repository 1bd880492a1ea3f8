import logging

import pytest
import torch

from bir.data.datamodule import RestorationDataModule
from bir.data.datasets import (
    ImageFolderDataset,
    PairedFolderDataset,
    RestoreFolderDataset,
    SamplePhotos,
    collate,
)
from bir.data.io import read_image, save_image


def _folder(tmp_path, sizes, sub=""):
    root = tmp_path / "imgs"
    for k, (h, w) in enumerate(sizes):
        save_image(torch.full((3, h, w), k / 10), root / sub / f"im{k}.png")
    return root


def test_corrupt_file_is_skipped_once_and_counted(tmp_path, caplog):
    root = _folder(tmp_path, [(8, 8), (8, 8)])
    (root / "im1.png").write_bytes(b"\x89PNG broken")
    ds = ImageFolderDataset(root)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))] + [ds[1]]
    assert all(it["gt"].shape == (3, 8, 8) for it in items)
    assert len(ds.skipped) == 1
    assert sum("im1.png" in r.message for r in caplog.records) == 1


def test_small_images_are_padded_or_upscaled(tmp_path):
    root = _folder(tmp_path, [(5, 12)])
    pad = ImageFolderDataset(root, crop_size=16, small="reflect")[0]["gt"]
    up = ImageFolderDataset(root, crop_size=16, small="upscale")[0]["gt"]
    assert pad.shape == up.shape == (3, 16, 16)


def test_center_crop_and_names_are_relative(tmp_path):
    root = _folder(tmp_path, [(10, 12)], sub="a/b")
    item = ImageFolderDataset(root, crop_size=4, crop="center")[0]
    assert item["name"] == "a/b/im0"
    assert item["gt"].shape == (3, 4, 4)


def test_file_list(tmp_path):
    root = _folder(tmp_path, [(4, 4), (4, 4), (4, 4)])
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nim2.png\nim0.png\n")
    ds = ImageFolderDataset(root, file_list=lst)
    assert [ds[i]["name"] for i in range(len(ds))] == ["im2", "im0"]


def test_paired_folder_matches_by_stem_and_warns(tmp_path, caplog):
    gt = _folder(tmp_path / "g", [(4, 4), (4, 4)])
    lq = tmp_path / "lq"
    save_image(torch.zeros(3, 4, 4), lq / "im0.jpg")
    with caplog.at_level(logging.WARNING):
        ds = PairedFolderDataset(gt, lq)
    assert len(ds) == 1 and ds[0]["name"] == "im0"
    assert any("im1" in r.message for r in caplog.records)


def test_restore_dataset_excludes_done_and_keeps_global_index(tmp_path):
    root = _folder(tmp_path, [(4, 4), (4, 4), (4, 4)])
    (root / "zbad.png").write_bytes(b"garbage")
    ds = RestoreFolderDataset(root, exclude=["im1"])
    assert [ds[i]["name"] for i in range(len(ds))] == ["im0", "im2"]
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 2]
    assert len(ds.skipped) == 1


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_collate_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        collate([{"lq": torch.zeros(3, 4, 4)}, {"lq": torch.zeros(3, 5, 4)}])
    b = collate([{"gt": torch.zeros(3, 2, 2), "name": "a", "index": 3}] * 2)
    assert (
        b["gt"].shape == (2, 3, 2, 2) and b["index"].tolist() == [3, 3] and b["name"] == ["a"] * 2
    )


def test_sample_photos_and_datamodule(sample_dir):
    train = SamplePhotos(sample_dir, "train", crop_size=32, flip=True, repeat=2)
    hold = SamplePhotos(sample_dir, "holdout", crop_size=32, crop="center")
    names = {hold[i]["name"] for i in range(len(hold))}
    assert len(train) == 26 and names == {"astronaut", "coffee", "chelsea", "rocket"}
    dm = RestorationDataModule(train=train, val=hold, batch_size=4, val_batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["gt"].shape == (4, 3, 32, 32) and batch["index"].dtype == torch.long
    assert 0 <= batch["gt"].min() and batch["gt"].max() <= 1


def test_scaled_sample_copies(tmp_path):
    from bir.data.samples import TRAIN_PHOTOS, sample_photo, write_scaled_copies

    paths = write_scaled_copies(tmp_path, [1.0, 0.5])
    assert len(paths) == len(TRAIN_PHOTOS)  # scale 1 is the photograph itself: no copy
    moon = read_image(tmp_path / "moon_x0.5.png")
    full = sample_photo("moon")
    assert moon.shape[-2:] == (full.shape[-2] // 2, full.shape[-1] // 2)
    expect = torch.nn.functional.avg_pool2d(full[None], 2)[0]
    assert (moon - expect).abs().max() <= 1 / 255 + 1e-6  # area = 2x2 mean, 8-bit round-off
    with pytest.raises(ValueError, match="not in"):
        write_scaled_copies(tmp_path, [2.0])


def test_cached_folder_dataset_hands_out_copies(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name in "ab":
        save_image(torch.rand(3, 16, 16, generator=g), tmp_path / f"{name}.png")
    cached = ImageFolderDataset(tmp_path, cache=True)
    plain = ImageFolderDataset(tmp_path)
    first = cached[0]["gt"]
    first.zero_()  # a consumer writing into its batch must not change the cache
    torch.testing.assert_close(cached[0]["gt"], plain[0]["gt"])
    assert set(cached.cache) == {0}


def test_prior_folder_experiment_trains_on_any_folder(tmp_path):
    import hydra
    from omegaconf import OmegaConf

    from tests.conftest import compose_config, net_config

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 3), ("holdout", 2)):
        for i in range(n):
            save_image(torch.rand(3, 80, 90, generator=g), tmp_path / split / f"{split}{i}.png")
    overrides = [
        "experiment=prior_folder",
        f"data.train.root={tmp_path / 'train'}",
        f"data.val.root={tmp_path / 'holdout'}",
    ]
    cfg = compose_config("train", *overrides)
    bare = compose_config("train", "experiment=prior_folder")
    samples = net_config("unet_adm_samples")
    assert OmegaConf.to_container(cfg.net) == OmegaConf.to_container(samples)  # same model size
    assert cfg.data.train.crop_size == 64 and cfg.data.train.cache is True
    assert OmegaConf.is_missing(bare.data.train, "root") and OmegaConf.is_missing(
        bare.data.val, "root"
    )
    dm = hydra.utils.instantiate(cfg.data)
    batch = next(iter(dm.train_dataloader()))
    assert batch["gt"].shape == (16, 3, 64, 64) and set(batch["name"]) <= {
        "train0",
        "train1",
        "train2",
    }
    val = next(iter(dm.val_dataloader()))
    assert val["gt"].shape == (2, 3, 128, 128) and val["name"] == ["holdout0", "holdout1"]
