import gzip

import pytest
import torch

from zsqpipe.config import DataConfig
from zsqpipe.data import BatchLoader, dataset_info, load_dataset, train_val_split
from zsqpipe.data.loaders import random_crop_flip
from zsqpipe.errors import DataError, IntegrityError
from zsqpipe.stages.data import load_prepared, prepare_data


def test_load_fixture(fashion_dir, no_debian_data):
    train = load_dataset("fashion_mnist", "train", fashion_dir)
    test = load_dataset("fashion_mnist", "test", fashion_dir)
    assert train.images.shape == (240, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 120 and train.labels.max() < 10


def test_missing_data_lists_every_place(tmp_path, no_debian_data):
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", "train", tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere") in msg and "no-debian" in msg and "allow_download" in msg
    assert "dataset-fashion-mnist" in msg


def test_truncated_idx_detected(fashion_dir, no_debian_data):
    path = fashion_dir / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion_mnist", "train", fashion_dir)


def test_cifar_missing_is_clear(tmp_path):
    with pytest.raises(DataError, match="cifar10: torchvision folder not found"):
        load_dataset("cifar10", "train", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        dataset_info("mnist3d")


def test_split_is_seeded_and_disjoint():
    tr, va = train_val_split(1000, 100, seed=3)
    tr2, va2 = train_val_split(1000, 100, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1000
    assert not torch.equal(va, train_val_split(1000, 100, seed=4)[1])


def test_manifest_roundtrip_and_tamper(fashion_dir, no_debian_data, tmp_path):
    cfg = DataConfig(data_dir=str(fashion_dir), val_size=40, test_subset=100)
    m = prepare_data("fashion_mnist", cfg, tmp_path / "manifest.json")
    assert m["n_train"] == 200 and m["n_val"] == 40 and m["n_test"] == 100
    d = load_prepared(tmp_path / "manifest.json")
    assert len(d.train) == 200 and len(d.val) == 40 and len(d.test) == 100
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match="SHA-256"):
        load_prepared(tmp_path / "manifest.json")


def test_batch_loader_seeded_order_and_normalisation(fashion_dir, no_debian_data):
    data = load_dataset("fashion_mnist", "train", fashion_dir)
    info = dataset_info("fashion_mnist")
    a = [y for _, y in BatchLoader(data, info, 32, shuffle=True, augment=True, seed=5)]
    b = [y for _, y in BatchLoader(data, info, 32, shuffle=True, augment=True, seed=5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    x, _ = next(iter(BatchLoader(data, info, 240)))
    assert abs(float(x.mean())) < 1.5 and x.dtype == torch.float32


def test_random_crop_flip_moves_pixels_consistently():
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    out = random_crop_flip(img, 1, True, torch.Generator().manual_seed(0))
    assert out.shape == img.shape
    for o in out:  # every output is a shifted (and maybe flipped) copy of the input, zero-padded
        nz = o[o > 0]
        assert set(nz.tolist()) <= set(range(16))
