"""Run an exported model in onnxruntime (CPU): predictions, the optimized graph's kernels, latency."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from zsqpipe.timing import median_ms

# onnxruntime kernels that compute a conv/linear on integers, and the float ones
INTEGER_KERNELS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm")
FLOAT_KERNELS = ("Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None, level: str = "all"):
    """An onnxruntime CPU session with ``threads`` intra-op threads (one inter-op thread). ``level``: ``all``
    (what deployment runs: layout transforms included) or ``extended`` (hardware-neutral fusions: QDQ -> QLinear*);
    ``optimized_path`` saves the optimized graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # no warning about saving a hardware-specific graph
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernel_counts(path: str | Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs after its hardware-neutral optimizations (``extended``: constant
    folding, QDQ -> QLinearConv/QGemm fusion), plus ``integer_kernels``/``float_kernels`` for convs and matmuls."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        session(path, 1, opt, level="extended")
        ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    counts = dict(sorted(ops.items()))
    counts["integer_kernels"] = sum(ops[k] for k in INTEGER_KERNELS)
    counts["float_kernels"] = sum(ops[k] for k in FLOAT_KERNELS)
    return counts


def predict_onnx(sess, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """Arg-max class of every image, in order."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x.numpy()})[0].argmax(1) for x in batches])


def onnx_latency_ms(path: str | Path, x: torch.Tensor, threads: int, runs: int = 20) -> float:
    sess = session(path, threads)
    name, feed = sess.get_inputs()[0].name, x.numpy()
    return median_ms(lambda: sess.run(None, {name: feed}), runs)


def torch_latency_ms(model: torch.nn.Module, x: torch.Tensor, threads: int, runs: int = 20) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return median_ms(lambda: model(x), runs)
    finally:
        torch.set_num_threads(before)
