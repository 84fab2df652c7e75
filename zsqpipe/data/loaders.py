"""Fast batch loaders.

In-memory datasets are served by :class:`BatchLoader`: whole batches are sliced from a uint8 tensor,
augmented with vectorised ops (random crop with zero padding, horizontal flip) and normalised on the
target device, without per-sample Python work. The order is drawn from a seeded ``torch.Generator``, so a
seed fixes the data order. ImageNet goes through a standard ``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from zsqpipe.data.datasets import DatasetInfo, ImageData


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding ``padding``) and horizontal flip of a uint8/float batch (N,C,H,W)."""
    n, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :]).to(images.device)
        cols = (dx[:, None] + torch.arange(w)[None, :]).to(images.device)
        idx = torch.arange(n, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(images.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()


class BatchLoader:
    """Iterate over (normalised float images, labels) batches of an in-memory :class:`ImageData`.

    ``seed`` fixes the shuffling/augmentation stream; each ``iter()`` continues the stream, so epoch k of a
    run with seed s always sees the same order.
    """

    def __init__(
        self,
        data: ImageData,
        info: DatasetInfo,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        crop_padding: int | None = None,
    ):
        self.data, self.info = data, info
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.gen = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.crop_padding = (4 if info.image_size >= 32 else 2) if crop_padding is None else crop_padding
        self.mean = torch.tensor(info.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self.new_order()
        for b in range(len(self)):
            yield self.batch(order, b)

    def new_order(self) -> torch.Tensor:
        """The sample order of the next pass (drawn from ``gen`` when shuffling)."""
        n = len(self.data)
        return torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)

    def batch(self, order: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``b`` of the pass with sample order ``order`` (augmentation draws from ``gen``)."""
        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
        x = self.data.images[idx].to(self.device, non_blocking=True)
        if self.augment:
            x = random_crop_flip(x, self.crop_padding, True, self.gen)
        x = (x.float() / 255.0 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.data.labels[idx].to(self.device, non_blocking=True)


class EndlessBatches:
    """Pass after pass over a :class:`BatchLoader` (the batches of ``engine.infinite(loader)``), with a position
    that can be saved: ``state_dict()`` holds the loader's generator, the current pass's order and the next
    batch index, so a restored stream continues with exactly the batches (and augmentations) the original
    would have produced next, without replaying the ones before."""

    def __init__(self, loader: BatchLoader):
        if len(loader) == 0:
            raise ValueError("EndlessBatches: the loader has no batch")
        self.loader = loader
        self.order: torch.Tensor | None = None
        self.next = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order is None or self.next >= len(self.loader):
            self.order, self.next = self.loader.new_order(), 0
        self.next += 1
        return self.loader.batch(self.order, self.next - 1)

    def state_dict(self) -> dict:
        return {"gen": self.loader.gen.get_state(), "order": self.order, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.loader.gen.set_state(state["gen"])
        self.order, self.next = state["order"], int(state["next"])


def endless(loader) -> Iterator:
    """Endless batches of ``loader``: an :class:`EndlessBatches` (resumable) for a :class:`BatchLoader`, else
    a plain generator (a ``DataLoader`` cannot save its position within a pass)."""
    if isinstance(loader, BatchLoader):
        return EndlessBatches(loader)
    return _cycle(loader)


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


def order_generator(loader) -> torch.Generator:
    """The generator that fixes a loader's data order and augmentation from pass to pass. Its state at a pass
    boundary is the loader's whole state (``DataLoader``: sampler and worker seeds are drawn from it when a
    pass starts)."""
    return loader.gen if isinstance(loader, BatchLoader) else loader.generator


def make_loader(
    data,
    info: DatasetInfo,
    batch_size: int,
    train: bool,
    seed: int = 0,
    device="cpu",
    channels_last: bool = False,
    augment: bool | None = None,
    workers: int = 4,
):
    """A loader for ``data``: :class:`BatchLoader` for in-memory data, a ``DataLoader`` otherwise.

    ``train`` shuffles and drops the last partial batch; ``augment`` (default: ``train``) applies the
    random crop + flip of in-memory datasets (ImageNet's transform is fixed by its split).
    """
    if isinstance(data, ImageData):
        return BatchLoader(
            data,
            info,
            batch_size,
            shuffle=train,
            augment=train if augment is None else augment,
            drop_last=train,
            seed=seed,
            device=device,
            channels_last=channels_last,
        )
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.device(device).type == "cuda",
    )
