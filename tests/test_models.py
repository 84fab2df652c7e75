import pytest
import torch

from zsqpipe.errors import ConfigError
from zsqpipe.models import available_models, create_model


def test_registry():
    assert {"resnet20", "resnet18", "mobilenet_v2"} <= set(available_models())
    with pytest.raises(ConfigError, match=r"archs: unknown model 'resnet9000'; expected one of \["):
        create_model("resnet9000")


@pytest.mark.parametrize(
    "name,channels,size,classes",
    [
        ("resnet20", 1, 28, 10),
        ("resnet20", 3, 32, 100),
        ("resnet18", 1, 28, 10),
        ("mobilenet_v2", 3, 32, 10),
        ("mobilenet_v2_small", 1, 28, 10),
    ],
)
def test_forward_shapes(name, channels, size, classes):
    model = create_model(name, num_classes=classes, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)


def test_resnet20_matches_pytorchcv_names_and_shapes():
    """A local pytorchcv resnet20_cifar10 checkpoint must load into our resnet20 (pytorchcv ships no weights)."""
    pytorchcv = pytest.importorskip("pytorchcv.models.resnet_cifar")
    ref = pytorchcv.resnet20_cifar10(pretrained=False)
    ours = create_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(ref_sd[k].shape == our_sd[k].shape for k in ref_sd)
    ours.load_state_dict(ref_sd)
    ref.eval(), ours.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref(x), ours(x), atol=1e-5)


def test_resnet20_parameter_count():
    # 0.27M parameters, as in He et al. (2016) and pytorchcv (with 1x1-conv shortcuts)
    n = sum(p.numel() for p in create_model("resnet20", 10, 3, 32).parameters())
    assert 0.26e6 < n < 0.28e6


def test_resnet18_relus_are_distinct_modules():
    model = create_model("resnet18", 10, 3, 32)
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) == 1 + 2 * 8
    # torchvision parameter names are kept (a torchvision checkpoint loads at 224 px)
    assert "layer1.0.conv1.weight" in model.state_dict()
