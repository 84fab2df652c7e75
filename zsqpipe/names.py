"""Names of the registered datasets, architectures and methods, importable without torch.

The Snakefile builds its wildcard constraints from these at parse time; the registries in
``zsqpipe.data``, ``zsqpipe.models`` and ``zsqpipe.methods`` are checked against them by the tests.
"""

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "imagenet")
# (channels, height, width) of each dataset's model input (zsqpipe.data.DatasetInfo; equal by test)
DATASET_INPUT_SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
                        "imagenet": (3, 224, 224)}  # fmt: skip
ARCH_NAMES = ("resnet20", "resnet18", "mobilenet_v2", "mobilenet_v2_small")
METHOD_NAMES = ("real", "ptq", "zeroq", "intraq", "hast", "gdfq", "qimera", "zaq")
SUPERNET_METHOD_NAMES = ("spos", "spos_calr_ms")  # zsqpipe.nas.calr.METHODS (supernet.variants build on them)
SYNTHESIZER_NAMES = (
    "zeroq",
    "intraq",
    "hast",
)  # offline sample synthesizers (module zsqpipe/zsq/synth_<name>.py)
# Methods that fine-tune on offline synthetic samples, and the synthesizer whose shards they read.
METHOD_SYNTHESIZER: dict[str, str] = {"zeroq": "zeroq", "intraq": "intraq", "hast": "hast"}
