"""Integer deployment: export a fake-quantized model to ONNX (QDQ) and run it on onnxruntime's integer kernels.

``export_onnx(model, input_shape, path)`` writes the QDQ graph (docs/deploy.md); ``zsqpipe.deploy.runtime``
runs it. onnx/onnxruntime are imported only here, never by the training stages.
"""

from zsqpipe.deploy.onnx_export import ExportError, ExportReport, PixelInput, export_float_onnx, export_onnx

__all__ = ["ExportError", "ExportReport", "PixelInput", "export_float_onnx", "export_onnx"]
