import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from zsqpipe.data import forbid_real_data, load_dataset
from zsqpipe.data.shards import ShardSet, write_shards
from zsqpipe.errors import DataError, IntegrityError


def make(tmp_path, n=10, shard_size=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 6, 6, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)
    write_shards(tmp_path, images, labels, difficulty, "hast", 3, shard_size, {"fp_checkpoint_sha256": "x"})
    return images, labels, difficulty


def test_roundtrip_is_bit_exact(tmp_path):
    images, labels, difficulty = make(tmp_path)
    shards = ShardSet.open(tmp_path / "manifest.json")
    assert len(shards) == 10 and shards.shape == (1, 6, 6) and len(shards.manifest["shards"]) == 3
    back = shards.load_all()
    assert torch.equal(back["images"], images) and torch.equal(back["labels"], labels)
    assert torch.equal(back["difficulty"], difficulty)
    streamed = list(shards.iter_batches(3, seed=1))
    assert sum(len(y) for _, y in streamed) == 10
    assert sorted(torch.cat([y for _, y in streamed]).tolist()) == sorted(labels.tolist())


def test_shards_are_plain_parquet(tmp_path):
    images, labels, _ = make(tmp_path)
    df = pd.read_parquet(tmp_path / "shard-00000.parquet")
    assert list(df.columns) == ["image", "label", "difficulty", "method", "seed"]
    assert (df["method"] == "hast").all() and (df["seed"] == 3).all()
    assert torch.equal(torch.tensor(df["image"].iloc[0]).view(1, 6, 6), images[0])
    assert pq.read_schema(tmp_path / "shard-00000.parquet").metadata[b"zsqpipe.shape"] == b"[1, 6, 6]"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corruption_is_detected(tmp_path, damage):
    make(tmp_path)
    shard = tmp_path / "shard-00001.parquet"
    raw = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        shard.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
    else:
        shard.unlink()
    shards = ShardSet.open(tmp_path / "manifest.json")
    with pytest.raises(IntegrityError, match="shard-00001"):
        shards.load_all()
    with pytest.raises(IntegrityError, match="shard-00001"):
        list(shards.iter_batches(2, seed=0, shuffle=False))


def test_real_data_guard(fashion_dir, no_debian_data):
    with forbid_real_data("test synthesis"), pytest.raises(DataError, match="must not read real data"):
        load_dataset("fashion_mnist", "train", fashion_dir)
    assert len(load_dataset("fashion_mnist", "train", fashion_dir)) == 240  # guard lifted
