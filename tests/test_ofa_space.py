"""The OFA / MobileNetV3 space, its elastic supernet and OQAT on it (zsqpipe/nas/spaces/ofa.py,
zsqpipe/nas/supernet_ofa.py, the ofa_mbv3 space of zsqpipe/nas/oqat/supernet.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.nas.oqat import (
    OQATSearchConfig,
    OQATTrainConfig,
    build_oqat_supernet,
    constrained_search,
    inherit_bits,
    init_step_sizes,
    lsq_quantizers,
    oqat_space,
    step_sizes,
    subnet_accuracy,
    subnet_bitops,
    train_oqat,
)
from zsqpipe.nas.spaces.ofa import OFASpaceConfig, make_divisible
from zsqpipe.nas.supernet_ofa import DynamicBatchNorm2d, DynamicConv2d, OFASupernet
from zsqpipe.quant import count_bitops

TINY = {"widths": [16, 24], "strides": [2, 2], "depth_list": [1, 2], "width_mult": 0.5, "stem_width": 16,
        "activations": ["relu", "h_swish"], "se": [False, True]}  # unit 2: h-swish and SE, as MBV3's later units


def tiny_space(**kw) -> OFASpaceConfig:
    return OFASpaceConfig.from_dict({**TINY, **kw})


# ---------------------------------------------------------------------------------------------- the space


def test_default_space_is_ofa_choices_and_counts_subnets():
    sp = OFASpaceConfig()
    assert (sp.ks_list, sp.expand_list, sp.depth_list) == ((3, 5, 7), (3, 4, 6), (2, 3, 4))
    assert sp.activations == ("relu", "relu", "h_swish", "h_swish", "h_swish")  # OFA's act_stages[1:]
    assert sp.se == (False, True, False, True, True) and sp.stem_activation == sp.final_activation == "h_swish"
    assert sp.num_blocks == 20 and sp.num_units == 5
    assert sp.num_archs == (9**2 + 9**3 + 9**4) ** 5  # OFA's ~2e19 subnets


def test_num_archs_matches_enumeration_of_canonical_strings():
    sp = tiny_space(ks_list=[3, 5], expand_list=[3])
    strings = set()
    for ks in itertools.product(sp.ks_list, repeat=sp.num_blocks):
        for d in itertools.product(sp.depth_list, repeat=sp.num_units):
            strings.add(sp.to_str({"ks": list(ks), "e": [3] * sp.num_blocks, "d": list(d)}))
    assert len(strings) == sp.num_archs == (2 + 4) ** 2


def test_string_round_trip_and_skipped_blocks_do_not_matter():
    sp = OFASpaceConfig()
    rng = random.Random(0)
    for _ in range(200):
        a = sp.sample(rng)
        s = sp.to_str(a)
        assert sp.to_str(sp.from_str(s)) == s
        assert s.count("|") == 4 and len(s.replace("|", "-").split("-")) == sum(a["d"])
    a = sp.uniform(3, 3, 2)
    b = {k: list(v) for k, v in a.items()}
    b["ks"][3] = 7  # block 3 of unit 0 does not run at depth 2
    assert sp.to_str(a) == sp.to_str(b)


@pytest.mark.parametrize(
    "arch, key",
    [
        ({"ks": [3] * 20, "e": [3] * 20}, "keys"),
        ({"ks": [3] * 19, "e": [3] * 20, "d": [2] * 5}, "architecture.ks"),
        ({"ks": [4] + [3] * 19, "e": [3] * 20, "d": [2] * 5}, "architecture.ks.0"),
        ({"ks": [3] * 20, "e": [3] * 20, "d": [2, 2, 5, 2, 2]}, "architecture.d.2"),
    ],
)
def test_bad_arch_names_the_key(arch, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        OFASpaceConfig().validate(arch)


@pytest.mark.parametrize(
    "d, key",
    [({"ks_list": [3, 4]}, "ofa.ks_list.1"), ({"strides": [2, 2]}, "ofa.strides"), ({"bogus": 1}, "ofa.bogus"),
     ({"stem_stride": 3}, "ofa.stem_stride"), ({"width_mult": 0}, "ofa.width_mult"),
     ({"widths": [16, 24], "strides": [2, 2]}, "ofa.activations"), ({"activations": ["relu"] * 4 + ["gelu"]},
     "ofa.activations.4"), ({"se": [True] * 4}, "ofa.se"), ({"final_activation": "swish"}, "ofa.final_activation")],
)  # fmt: skip
def test_bad_space_config_names_the_key(d, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        OFASpaceConfig.from_dict(d)


def test_bad_string_is_one_clear_error():
    with pytest.raises(ConfigError, match="OFA architecture string"):
        OFASpaceConfig().from_str("k3e3|k3e3")
    with pytest.raises(ConfigError, match="block 'x3e3'"):
        OFASpaceConfig().from_str("|".join(["x3e3-k3e3"] * 5))


def test_mutate_and_crossover_stay_in_the_space():
    sp = OFASpaceConfig()
    rng = random.Random(1)
    a, b = sp.sample(rng), sp.sample(rng)
    for _ in range(50):
        m = sp.mutate(a, rng, 0.1)
        assert sp.validate(m) and sp.to_str(m) != sp.to_str(a)
        c = sp.crossover(a, b, rng)
        assert all(x in (y, z) for k in c for x, y, z in zip(c[k], a[k], b[k], strict=True))


def test_make_divisible_like_mobilenet():
    assert [make_divisible(v) for v in (6, 10, 12, 20, 36, 96)] == [8, 16, 16, 24, 40, 96]


# ------------------------------------------------------------------------------------------- the supernet


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.normal_(1, 0.1, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            if isinstance(m, DynamicConv2d) and m.kernel_transform:
                for p in m.transforms.values():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("transform", [True, False])
def test_extracted_subnet_equals_supernet(transform):
    torch.manual_seed(0)
    sp = tiny_space(kernel_transform=transform)
    model = OFASupernet(sp, 1, 10)
    _perturb(model)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    rng = random.Random(0)
    for arch in [sp.largest, sp.smallest] + [sp.sample(rng) for _ in range(6)]:
        model.set_active_subnet(arch)
        static = model.get_active_subnet().eval()
        assert not any(isinstance(m, DynamicConv2d | DynamicBatchNorm2d) for m in static.modules())
        torch.testing.assert_close(static(x), model(x), rtol=1e-5, atol=1e-5)
        macs_dyn = sum(r.macs for r in count_bitops(model, (1, 28, 28)))
        macs_static = sum(r.macs for r in count_bitops(static, (1, 28, 28)))
        assert macs_dyn == macs_static  # DynamicConv2d.active_macs = the plain-conv count of its slice


def test_elastic_kernel_is_centre_crop_without_transform():
    conv = DynamicConv2d(4, 4, 7, depthwise=True, ks_list=(3, 5, 7), kernel_transform=False)
    conv.active_kernel = 3
    torch.testing.assert_close(conv.active_weight(), conv.weight[..., 2:5, 2:5])
    conv.active_kernel, conv.active_out, conv.active_in = 5, 2, 2
    torch.testing.assert_close(conv.active_weight(), conv.weight[:2, :, 1:6, 1:6])


def test_elastic_kernel_transform_chains_7_to_5_to_3():
    conv = DynamicConv2d(2, 2, 7, depthwise=True, ks_list=(3, 5, 7), kernel_transform=True)
    assert sorted(conv.transforms) == ["5to3", "7to5"]
    with torch.no_grad():
        conv.transforms["7to5"].copy_(torch.randn(25, 25))
        conv.transforms["5to3"].copy_(torch.randn(9, 9))
    conv.active_kernel = 3
    w5 = conv.weight[..., 1:6, 1:6].reshape(-1, 25) @ conv.transforms["7to5"].T
    w3 = w5.reshape(2, 1, 5, 5)[..., 1:4, 1:4].reshape(-1, 9) @ conv.transforms["5to3"].T
    torch.testing.assert_close(conv.active_weight(), w3.reshape(2, 1, 3, 3))


def test_depth_runs_the_first_blocks_and_gradients_stay_in_the_slice():
    torch.manual_seed(0)
    sp = tiny_space()
    model = OFASupernet(sp, 1, 10)
    arch = sp.uniform(3, 3, 1)
    model.set_active_subnet(arch)
    assert model._runs == [0, 2]  # units of max depth 2: the first block of each
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(p.grad is None for p in model.blocks[1].parameters())  # skipped block: untouched
    dw = model.blocks[0].depthwise[0]
    mid = make_divisible(model.blocks[0].cin * 3)
    g = dw.weight.grad
    assert g[:mid, :, 2:5, 2:5].abs().sum() > 0
    assert g[mid:].abs().sum() == 0 and g[:, :, :2].abs().sum() == 0  # outside the active channels / kernel


def test_dynamic_bn_matches_plain_bn_and_writes_its_slice():
    torch.manual_seed(0)
    dyn, ref = DynamicBatchNorm2d(8, momentum=None), nn.BatchNorm2d(5, momentum=None)
    ref.load_state_dict({k: v[:5] if v.dim() else v for k, v in dyn.state_dict().items()})
    before = dyn.running_mean.clone()
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3) * 2 + 1
        torch.testing.assert_close(dyn(x), ref(x))
    torch.testing.assert_close(dyn.running_mean[:5], ref.running_mean)
    torch.testing.assert_close(dyn.running_var[:5], ref.running_var)
    assert torch.equal(dyn.running_mean[5:], before[5:])
    dyn.eval(), ref.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(dyn(x), ref(x))


# ----------------------------------------------------------------------------------------- OQAT on OFA


def ofa_cfg(**kw) -> OQATTrainConfig:
    return OQATTrainConfig(space="ofa_mbv3", ofa=TINY, epochs=1, iters=3, batch_size=8, **kw)


def test_oqat_config_checks_the_space():
    assert ofa_cfg().ofa == tiny_space().to_dict()  # canonical: every key
    with pytest.raises(ConfigError, match=r"oqat\.train\.weight_quantizer"):
        ofa_cfg(weight_quantizer="lsq")
    with pytest.raises(ConfigError, match=r"oqat\.train\.ofa: only for space ofa_mbv3"):
        OQATTrainConfig(ofa=TINY)
    with pytest.raises(ConfigError, match=r"oqat\.train\.ofa\.depth"):
        OQATTrainConfig(space="ofa_mbv3", ofa={"depth": [2]})
    with pytest.raises(ConfigError, match=r"oqat\.train\.space"):
        OQATTrainConfig(space="mbv2")


def test_quantized_ofa_supernet_shares_one_step_per_layer_and_counts_bitops():
    torch.manual_seed(0)
    cfg = ofa_cfg()
    model = build_oqat_supernet(cfg, 1, 10)
    convs = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert convs and all(m.weight_quantizer.bits == 4 and m.weight_quantizer.scale.dim() == 0 for m in convs)
    assert model.stem[0].weight_quantizer.bits == 32 and model.classifier.weight_quantizer.bits == 32
    x = [torch.randn(8, 1, 28, 28)]
    init_step_sizes(model, x)
    space = oqat_space(model)
    big, small = (
        subnet_bitops(model, a, (1, 28, 28)) for a in (space.largest, space.cfg.to_str(space.cfg.smallest))
    )
    assert big["bitops"] > small["bitops"] > 0
    # every quantized conv sees 4-bit inputs (block inputs: the signed input quantizer), so BitOPs = 16 x
    # MACs; the stem conv and the classifier are FP
    recs = count_bitops(model.set_active_subnet(space.largest), (1, 28, 28))
    assert all(r.act_bits == 4 for r in recs if r.weight_bits == 4)
    assert big["bitops"] == 16 * sum(r.macs for r in recs if r.weight_bits == 4)
    assert [r.name for r in recs if r.weight_bits == 32] == [  # FP: the stem conv, the SE convs, the classifier
        "stem.0", *[f"blocks.{b}.depthwise.3.{c}" for b in (2, 3) for c in ("reduce", "expand")], "classifier",
    ]  # fmt: skip
    assert model.blocks[0].input_quant.quantizer.q_n < 0  # signed
    se = model.blocks[2].depthwise[3]
    assert se.out_quant.quantizer.q_n < 0 and model.blocks[2].expand[2][1].quantizer.q_n < 0  # after h-swish
    assert model.blocks[0].expand[2][1].quantizer.q_n == 0  # after ReLU: unsigned (quantize_model)
    assert not isinstance(model.blocks[2].depthwise[2], nn.Sequential)  # the SE input has no quantizer
    with pytest.raises(ValueError, match="quantized"):
        model.get_active_subnet()
    official = build_oqat_supernet(ofa_cfg(block_input_quant="unsigned"), 1, 10)
    assert official.blocks[0].input_quant.quantizer.q_n == 0  # OQA's lsq_conv.py: every conv input unsigned
    assert official.blocks[2].depthwise[3].out_quant.quantizer.q_n == 0
    steps = step_sizes(model)
    model.set_active_subnet(space.cfg.to_str(space.cfg.smallest))
    model(x[0])
    assert step_sizes(model).keys() == steps.keys()  # the smaller subnet uses the same (shared) quantizers


def test_ofa_train_inherit_and_search_end_to_end():
    torch.manual_seed(0)
    cfg = ofa_cfg()
    model = build_oqat_supernet(cfg, 1, 10)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)
    ]
    init_step_sizes(model, [x for x, _ in batches[:1]])
    hist = train_oqat(model, batches, cfg, log=None)
    assert len(hist) == 1 and hist[0]["train_loss"] > 0
    child_cfg = ofa_cfg(bits=3)
    child = inherit_bits(model, child_cfg, 3, "double")
    parent_steps, child_steps = step_sizes(model), step_sizes(child)
    for k, v in parent_steps.items():
        torch.testing.assert_close(child_steps[k], 2 * v)
    with pytest.raises(ConfigError, match=r"oqat\.train\.ofa"):
        inherit_bits(model, OQATTrainConfig(space="ofa_mbv3", ofa={**TINY, "width_mult": 0.25}, bits=3), 3)
    space = oqat_space(child)
    costs = {}

    def cost(a):
        costs.setdefault(a, subnet_bitops(child, a, (1, 28, 28))["bitops"])
        return costs[a]

    budget = 0.5 * cost(space.largest)
    scfg = OQATSearchConfig(population=4, generations=1, children=2, parents=2)
    r = constrained_search(lambda a: subnet_accuracy(child, a, batches[:1], batches[1:]), cost, budget, scfg,
                           space=space)  # fmt: skip
    assert r["arch"] is not None and r["cost"] <= budget and len(r["evaluated"]) >= 4
    assert all(isinstance(a, str) and cost(a) <= budget for a in r["evaluated"])
    assert space.describe(r["arch"])["ofa"]["d"] == [len(u.split("-")) for u in r["arch"].split("|")]
    assert all(len(lsq_quantizers(child)) == len(lsq_quantizers(model)) for _ in [0])


# ------------------------------------------------------------------------------------------------ workflow


def test_workflow_builds_oqat_table_on_the_ofa_space(tmp_path):
    """config/smoke.yaml's oqat section with ``oqat.train.space: ofa_mbv3`` through snakemake (4 -> 3 bits):
    the checkpoints, searches and the table carry OFA architectures; an OFA size setting reruns every OQAT
    job, never the data."""
    import pandas as pd
    from conftest import make_fashion_fixture
    from workflow_helpers import planned_jobs, snakemake, write_config

    from zsqpipe.io import read_json

    root = make_fashion_fixture(tmp_path / "fmnist", n_train=400, n_test=200)
    over = {"tracking": False, "data__data_dir": str(root), "data__val_size": 100, "oqat__bits": [4, 3],
            "oqat__train__space": "ofa_mbv3", "oqat__train__ofa": {**TINY, "depth_list": [1, 2]}}  # fmt: skip
    cfg = write_config(tmp_path / "smoke.yaml", **over)
    snakemake(tmp_path, cfg, "--cores", "2", "results/tables/oqat.csv")
    t = pd.read_csv(tmp_path / "results/tables/oqat.csv")
    assert list(t["bits"]) == [4, 4, 3, 3] and t["test_top1_mean"].notna().all()
    md = (tmp_path / "results/tables/oqat.md").read_text()
    assert "OQAT on the OFA / MobileNetV3 space" in md and "Cells: the ops on edges" not in md
    s3 = read_json(tmp_path / "results/nas/oqat/fashion_mnist/w3/seed0/search.json")
    found = [r for r in s3["found"] if r["arch"] is not None]
    assert found and all(OFASpaceConfig.from_dict(TINY).to_str(r["ofa"]) == r["arch"] for r in found)
    assert s3["supernet"]["config"]["space"] == "ofa_mbv3"
    m3 = read_json(tmp_path / "results/nas/oqat/fashion_mnist/w3/seed0/metrics.json")
    assert m3["inherited_from"]["bits"] == 4 and m3["config"]["ofa"]["widths"] == TINY["widths"]
    cfg2 = write_config(tmp_path / "w.yaml", **{**over, "oqat__train__ofa": {**TINY, "width_mult": 0.25}})
    jobs = planned_jobs(tmp_path, cfg2, "results/tables/oqat.csv")
    assert sorted({r for r, _ in jobs}) == ["oqat_search", "oqat_table", "oqat_train"]
    assert sum(r == "oqat_train" for r, _ in jobs) == 2


def test_se_is_ofa_dynamic_se_on_the_active_channels():
    """DynamicSE on C active channels = a plain SE (reduce to make_divisible(C / 4), ReLU, expand, h-sigmoid)
    built from the leading slices of its weights; channels outside the slice get no gradient."""
    torch.manual_seed(0)
    from zsqpipe.nas.supernet_ofa import DynamicSE

    se = DynamicSE(48)
    x = torch.randn(2, 24, 5, 5, requires_grad=True)
    mid = make_divisible(24 // 4)
    y = x.mean((2, 3), keepdim=True)
    y = torch.relu(nn.functional.conv2d(y, se.reduce.weight[:mid, :24], se.reduce.bias[:mid]))
    y = nn.functional.conv2d(y, se.expand.weight[:24, :mid], se.expand.bias[:24])
    ref = x * torch.clamp(y + 3, 0, 6) / 6
    out = se(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert se.reduce.weight.grad[mid:].abs().sum() == 0 and se.expand.weight.grad[24:].abs().sum() == 0
    assert se.reduce.weight.grad[:mid, :24].abs().sum() > 0
