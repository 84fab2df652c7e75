"""The quantized OQAT supernet on either space: LSQ quantization of the NB201 / OFA supernet (shared step
sizes), the space adapters (sample / mutate / crossover / to_str), step-size init, bit inheritance, subnet
BitOPs and accuracy after BN recalibration."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.nas.calr import sample_arch
from zsqpipe.nas.oqat.config import INHERIT_RULES, LARGEST, UNIFORM_CONV_ARCHS, OQATTrainConfig, Supernet
from zsqpipe.nas.spaces.nb201 import NUM_EDGES, OPS, Arch, arch_to_str, uniform_crossover
from zsqpipe.nas.spaces.ofa import OFASpaceConfig
from zsqpipe.nas.supernet201 import NB201Supernet, recalibrate_bn
from zsqpipe.nas.supernet_ofa import OFASupernet
from zsqpipe.quant import QuantConfig, count_bitops, quantize_model, set_quant_state
from zsqpipe.quant.config import FP_BITS
from zsqpipe.quant.modules import QuantAct
from zsqpipe.quant.quantizers import LSQQuantizer, create_quantizer

# ----------------------------------------------------------------------------------------------------------
# Quantized supernet


HEAD_ACT = {"nb201": "lastact.1", "ofa_mbv3": "final_expand.2"}  # the ReLU that only feeds the FP classifier


def oqat_quant_config(
    bits: int, weight_quantizer: str = "lsq_tensor", space: str = "nb201", head_relu: bool = True
) -> QuantConfig:
    """W = A = ``bits`` LSQ everywhere except the stem conv, the classifier and the head's ReLU (which only
    feeds the FP classifier): OQAT leaves the first conv and the classifier in full precision. ``head_relu``
    false: the head's activation is no ReLU (OFA's h-swish), which ``quantize_model`` does not quantize anyway."""
    return QuantConfig(
        weight_bits=bits,
        act_bits=bits,
        first_layer_bits=FP_BITS,
        last_layer_bits=FP_BITS,
        layer_bits={HEAD_ACT[space]: FP_BITS} if head_relu else {},
        weight_quantizer=weight_quantizer,
        act_quantizer="lsq",
    )


class NB201Space:
    """The NB201 cell space as OQAT sees it (:class:`~zsqpipe.nas.spaces.SearchSpace` on ``random.Random``, SPOS
    sampling): archs are op tuples (hashable), strings the NB201 format."""

    name = "nb201"
    largest: Arch = LARGEST
    cover: tuple[Arch, ...] = UNIFORM_CONV_ARCHS  # together they run every quantized layer

    def sample(self, rng: random.Random) -> Arch:
        return sample_arch(rng)

    def mutate(self, arch: Arch, rng: random.Random, p: float) -> Arch:
        """Re-draw each edge with probability ``p`` (at least one) to a different op."""
        ops = list(arch)
        edges = [e for e in range(NUM_EDGES) if rng.random() < p] or [rng.randrange(NUM_EDGES)]
        for e in edges:
            ops[e] = rng.choice([o for o in OPS if o != ops[e]])
        return tuple(ops)

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        return uniform_crossover(a, b, rng)

    def to_str(self, arch: Arch) -> str:
        return arch_to_str(arch)

    def describe(self, arch: Arch) -> dict[str, Any]:
        return {"ops": list(arch)}


class OFAMBV3Space:
    """The OFA / MobileNetV3 space as OQAT sees it: archs are canonical strings (:meth:`OFASpaceConfig.to_str`,
    hashable, one per distinct subnet); mutation and crossover act on OFA's dict (OFA's evolution finder)."""

    name = "ofa_mbv3"

    def __init__(self, cfg: OFASpaceConfig):
        self.cfg = cfg
        self.largest = cfg.to_str(cfg.largest)
        self.cover = (self.largest,)  # the largest subnet runs every elastic layer at full size

    def sample(self, rng: random.Random) -> str:
        return self.cfg.to_str(self.cfg.sample(rng))

    def mutate(self, arch: str, rng: random.Random, p: float) -> str:
        return self.cfg.to_str(self.cfg.mutate(self.cfg.from_str(arch), rng, p))

    def crossover(self, a: str, b: str, rng: random.Random) -> str:
        return self.cfg.to_str(self.cfg.crossover(self.cfg.from_str(a), self.cfg.from_str(b), rng))

    def to_str(self, arch: str) -> str:
        return arch

    def describe(self, arch: str) -> dict[str, Any]:
        return {"ofa": self.cfg.from_str(arch)}


def oqat_space(cfg_or_model: OQATTrainConfig | nn.Module) -> NB201Space | OFAMBV3Space:
    """The search-space adapter of a train config or of a supernet."""
    x = cfg_or_model
    if isinstance(x, OFASupernet):
        return OFAMBV3Space(x.space)
    if isinstance(x, OQATTrainConfig) and x.space == "ofa_mbv3":
        return OFAMBV3Space(OFASpaceConfig.from_dict(x.ofa))
    return NB201Space()


def build_oqat_supernet(
    cfg: OQATTrainConfig, in_channels: int, num_classes: int, bits: int | None = None
) -> Supernet:
    """The supernet of ``cfg`` (NB201 or OFA space; BN with running statistics, recalibrated per subnet)
    quantized at ``bits`` (default ``cfg.bits``). Step sizes are uninitialised until :func:`init_step_sizes`
    (or the first forward of a layer, LSQ's first-batch init) sets them."""
    if cfg.space == "ofa_mbv3":
        model: Supernet = OFASupernet(OFASpaceConfig.from_dict(cfg.ofa), in_channels, num_classes)
    else:
        model = NB201Supernet(
            C=cfg.C,
            N=cfg.N,
            in_channels=in_channels,
            num_classes=num_classes,
            affine=cfg.bn_affine,
            track_running_stats=True,
        )
    bits = cfg.bits if bits is None else bits
    head_relu = not isinstance(model, OFASupernet) or type(model.final_expand[2]) is nn.ReLU
    quantize_model(model, oqat_quant_config(bits, cfg.weight_quantizer, cfg.space, head_relu))
    if isinstance(model, OFASupernet):  # LSQ on the block inputs, after h-swish and on the SE outputs
        signed = cfg.block_input_quant == "signed"

        def lsq(negative: bool) -> QuantAct:
            return QuantAct(create_quantizer("lsq", "act", bits, signed=signed and negative))

        model.attach_input_quantizers(lambda: lsq(True), lsq)
    model.oqat_bits = bits
    return model


def _restore(model: Supernet, arch) -> None:
    if arch is None:
        model.arch = None
    else:
        model.set_active_subnet(arch)


def lsq_quantizers(model: nn.Module) -> list[tuple[str, LSQQuantizer]]:
    """The active (bits < 32) LSQ quantizers of ``model`` with their module names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LSQQuantizer) and m.bits < FP_BITS]


def step_sizes(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{quantizer name: step size}`` (detached copies) of every active LSQ quantizer."""
    return {n: q.scale.detach().clone() for n, q in lsq_quantizers(model)}


def _reset_steps(model: nn.Module) -> None:
    for _, q in lsq_quantizers(model):
        q._n = 0
        q.num_updates.zero_()


@torch.no_grad()
def init_step_sizes(model: Supernet, batches: Sequence[torch.Tensor], reset: bool = True) -> None:
    """LSQ step-size init (Esser et al. 2020; OQAT ``lsq_conv.py``): s = 2 mean|x| / sqrt(Q_P) for every weight
    and activation quantizer, averaged over ``batches`` (inputs) run through subnets that together reach every
    quantized layer of the supernet (NB201: the all-conv1x1 and all-conv3x3 cells; OFA: the largest subnet,
    so an elastic layer's weight step is initialised on its full weight). BN running statistics are left as
    they were (they are recalibrated before any evaluation)."""
    if reset:
        _reset_steps(model)
    arch, was_training = model.arch, model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    set_quant_state(model, update_ranges=True)
    model.train()
    try:
        for a in oqat_space(model).cover:
            model.set_active_subnet(a)
            for x in batches:
                model(x)
    finally:
        set_quant_state(model, update_ranges=False)
        for m, s in zip(bns, saved, strict=True):
            m.load_state_dict(s)
        _restore(model, arch)
        model.train(was_training)


def inherit_bits(
    parent: Supernet,
    cfg: OQATTrainConfig,
    bits: int,
    rule: str = "double",
    init_batches: Sequence[torch.Tensor] | None = None,
) -> Supernet:
    """OQAT bit inheritance: a ``bits``-bit supernet initialised from the trained ``parent`` (higher bits):
    every weight, BN parameter/statistic and step size is copied, then each active step is set by ``rule``:

    - ``double``: s_{b'} = 2^(b - b') s_b, i.e. s_{b-1} = 2 s_b per bit (the reference note's rule, from a
      secondary summary of the paper: the clipping range Q_P s is roughly kept, 7 s_4 ~ 3 (2 s_4) for weights
      and 15 s_4 ~ 7 (2 s_4) for activations);
    - ``reinit``: LSQ's init 2 mean|x| / sqrt(Q_P) at the new bits (:func:`init_step_sizes` on
      ``init_batches``, required).
    """
    if rule not in INHERIT_RULES:
        raise ConfigError(f"oqat.train.inherit_rule: expected one of {list(INHERIT_RULES)}, got {rule!r}")
    parent_bits = int(getattr(parent, "oqat_bits", 0))
    if not 2 <= bits < parent_bits:
        raise ConfigError(f"oqat: bit inheritance goes to fewer bits (>= 2): {parent_bits} -> {bits}")
    if isinstance(parent, OFASupernet):
        same = (("space", "ofa_mbv3"), ("ofa", parent.space.to_dict()))
    else:
        same = (("space", "nb201"), ("C", parent.C), ("N", parent.N))
    for key, have in same:
        if getattr(cfg, key) != have:
            raise ConfigError(
                f"oqat.train.{key}: the config says {getattr(cfg, key)!r}, the parent has {have!r}"
            )
    child = build_oqat_supernet(cfg, parent.in_channels, parent.num_classes, bits)
    device = next(parent.parameters()).device
    child.to(device).load_state_dict(parent.state_dict())
    if rule == "double":
        factor = 2.0 ** (parent_bits - bits)
        for _, q in lsq_quantizers(child):
            q.scale.data.mul_(factor)
    else:
        if not init_batches:
            raise ConfigError("oqat: inherit_rule 'reinit' needs training batches to re-initialise the steps")
        init_step_sizes(child, init_batches)
    child.inherited = {"from_bits": parent_bits, "rule": rule}
    return child


# ----------------------------------------------------------------------------------------------------------
# BitOPs, evaluation


def subnet_bitops(model: Supernet, arch: Arch | str | int, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Cost of subnet ``arch`` for one input of ``input_shape`` (C, H, W), counted over the layers its
    forward runs (:func:`zsqpipe.quant.count_bitops`): ``bitops`` = sum over quantized conv/linear layers of
    MACs x weight_bits x act_bits (act_bits = 32 for an unquantized input: the ResNet shortcut conv after avg-pool);
    ``fp_macs`` = MACs of the full-precision layers (stem conv, OFA's SE convs, classifier), not in ``bitops``; ``macs`` = all
    MACs; ``oqat_mflops`` = (fp_macs + bitops / 64) / 1e6, OQAT's ``profile_quant`` cost."""
    saved = model.arch
    model.set_active_subnet(arch)
    try:
        records = count_bitops(model, tuple(input_shape))
    finally:
        _restore(model, saved)
    quantized = [r for r in records if r.weight_bits < FP_BITS]
    bitops = sum(r.bitops for r in quantized)
    fp_macs = sum(r.macs for r in records if r.weight_bits >= FP_BITS)
    return {
        "bitops": int(bitops),
        "fp_macs": int(fp_macs),
        "macs": int(sum(r.macs for r in records)),
        "oqat_mflops": (fp_macs + bitops / 64) / 1e6,
        "quantized_layers": len(quantized),
    }


@torch.no_grad()
def subnet_accuracy(
    model: Supernet,
    arch: Arch | str | int,
    bn_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Top-1 (%) of subnet ``arch`` on ``eval_batches`` after BN recalibration on ``bn_batches`` (OQAT: the
    subnet is deployed without retraining, only its BN statistics are re-estimated)."""
    was_training = model.training
    model.set_active_subnet(arch)
    recalibrate_bn(model, bn_batches, len(bn_batches))
    model.eval()
    hits, n = 0, 0
    for x, y in eval_batches:
        hits += int((model(x).argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return 100.0 * hits / max(n, 1)
