"""Generators of the GDFQ family (GDFQ ``main.py: Generator``, ZAQ ``network/gan.py``), sized by config.

Both take the output shape (C, H, W) with H = W divisible by 4 (28 for Fashion-MNIST, 32 for CIFAR) and
end in ``Tanh`` + ``BatchNorm2d(C, affine=False)``, so samples live in the teacher's normalised input space.
The positional ``0.8`` in GDFQ's ``BatchNorm2d(128, 0.8)`` is the BN *eps* (an inherited quirk), kept here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.zsq.bnstats import BNStatistics


class GDFQGenerator(nn.Module):
    """Class-conditional generator: input = Embedding(y) * z (GDFQ CIFAR generator)."""

    def __init__(self, num_classes: int, shape: tuple[int, int, int], latent_dim: int = 100):
        super().__init__()
        channels, size, _ = shape
        if size % 4:
            raise ValueError(f"GDFQGenerator: image size {size} is not divisible by 4")
        self.num_classes, self.latent_dim, self.init_size = num_classes, latent_dim, size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2)
        )
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
            nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False),
        )  # fmt: skip

    def embed(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.label_emb(labels) * z

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        out = self.l1(h).view(h.shape[0], 128, self.init_size, self.init_size)
        img = self.conv_blocks0(out)
        img = self.conv_blocks1(F.interpolate(img, scale_factor=2))
        return self.conv_blocks2(F.interpolate(img, scale_factor=2))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decode(self.embed(z, labels))


class ZAQGenerator(nn.Module):
    """Unconditional generator (ZAQ ``network/gan.py: GeneratorA``), latent ``nz``."""

    def __init__(self, shape: tuple[int, int, int], nz: int = 256):
        super().__init__()
        channels, size, _ = shape
        if size % 4:
            raise ValueError(f"ZAQGenerator: image size {size} is not divisible by 4")
        self.nz, self.init_size = nz, size // 4
        self.l1 = nn.Linear(nz, 128 * self.init_size**2)
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2)
        )
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2),
            nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size)
        img = self.conv_blocks0(out)
        img = self.conv_blocks1(F.interpolate(img, scale_factor=2))
        return self.conv_blocks2(F.interpolate(img, scale_factor=2))


def gdfq_generator_step(
    generator: GDFQGenerator,
    teacher: nn.Module,
    bn_stats: BNStatistics,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    rng: torch.Generator,
    device: torch.device,
    bns_weight: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One GDFQ generator update, L_G = CE(T(G(z, y)), y) + bns_weight * BNS (GDFQ ``trainer.py``).

    ``bn_stats`` must hook ``teacher``. Returns the batch (detached), its labels and L_G.
    """
    z = torch.randn(batch_size, generator.latent_dim, generator=rng).to(device)
    y = torch.randint(0, generator.num_classes, (batch_size,), generator=rng).to(device)
    x = generator(z, y)
    loss = F.cross_entropy(teacher(x), y) + bns_weight * bn_stats.batch_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return x.detach(), y, float(loss.detach())
