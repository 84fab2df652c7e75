"""OQAT on the NAS-Bench-201 space (default) or the OFA / MobileNetV3 space (``space: ofa_mbv3``,
docs/methods/ofa_space.md): a quantized weight-sharing supernet with shared LSQ step sizes, bit
inheritance, BN recalibration, subnet BitOPs and a BitOPs-constrained evolutionary search.

Shen, Liang, Gong, Li, Li, Lin, Yu, Yan, Ouyang, "Once Quantization-Aware Training: High Performance Extremely
Low-bit Architecture Search" (OQAT, ICCV 2021); evaluation code ``LaVieEnRoseSMZ/OQA`` (the training code is
unreleased). docs/methods/oqat.md lists the equations, sources, choices and deviations. In short:

- **Quantized supernet** (:func:`build_oqat_supernet`): :class:`~zsqpipe.nas.supernet201.NB201Supernet` with
  every conv/linear swapped by :func:`~zsqpipe.quant.quantize_model` for an LSQ-quantized one (Esser et al.,
  ICLR 2020, Eq. 1-3; ``lsq_tensor``: one weight step per layer, as OQAT's scalar ``sw``) and an LSQ
  activation quantizer after every ReLU (one ``sa`` per layer, on the conv input of each ReLU-Conv-BN). The
  weights and both steps live in the supernet's layer, so every subnet that runs that layer uses (and trains)
  the *same* step sizes: this is OQAT's shared step size. Stem conv and classifier stay full precision (OQAT).
- **Bit inheritance** (:func:`inherit_bits`): copy weights, BN and steps of the b-bit supernet into a b'-bit one
  and set s_{b'} = 2^(b-b') s_b (rule ``double``; 4 -> 3: s_3 = 2 s_4), or re-initialise every step with LSQ's
  init 2 mean|x| / sqrt(Q_P) (rule ``reinit``).
- **BN recalibration** (:func:`recalibrate_bn`, re-exported from supernet201): reset running statistics,
  forward N training batches in train mode with momentum None (cumulative average), then evaluate.
- **BitOPs** (:func:`subnet_bitops`): sum over the subnet's quantized conv/linear layers that run of
  MACs x weight_bits x act_bits (act_bits = 32 where the input is not quantized: the ResNet shortcut conv after avg-pool).
  FP layers (stem, classifier) are reported as MACs separately and as OQAT's FLOPs = FP MACs + BitOPs / 64.
- **Search** (:func:`constrained_search`): evolution (mutation + crossover) over cells with BitOPs <= budget,
  ranked by *validation* accuracy after BN recalibration; the function never sees test data.
"""

from zsqpipe.nas.oqat.config import (
    INHERIT_RULES,
    LARGEST,
    SPACES,
    OQATSearchConfig,
    OQATTrainConfig,
)
from zsqpipe.nas.oqat.search import constrained_search, pareto_front
from zsqpipe.nas.oqat.supernet import (
    NB201Space,
    OFAMBV3Space,
    build_oqat_supernet,
    inherit_bits,
    init_step_sizes,
    lsq_quantizers,
    oqat_quant_config,
    oqat_space,
    recalibrate_bn,
    step_sizes,
    subnet_accuracy,
    subnet_bitops,
)
from zsqpipe.nas.oqat.train import train_oqat

__all__ = [
    "INHERIT_RULES",
    "LARGEST",
    "SPACES",
    "NB201Space",
    "OFAMBV3Space",
    "OQATSearchConfig",
    "OQATTrainConfig",
    "build_oqat_supernet",
    "constrained_search",
    "inherit_bits",
    "init_step_sizes",
    "lsq_quantizers",
    "oqat_space",
    "oqat_quant_config",
    "pareto_front",
    "recalibrate_bn",
    "step_sizes",
    "subnet_accuracy",
    "subnet_bitops",
    "train_oqat",
]
