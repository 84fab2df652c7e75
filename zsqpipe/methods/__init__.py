"""Quantization methods as plug-ins: ``@register_method("name")`` in ``zsqpipe/methods/<name>.py``.

``get_method(name)`` imports that one module on demand, so each method's code hash covers only its own
module (plus what it imports), and adding a method touches one new file (+ its docs page and config
defaults in the schema).
"""

from zsqpipe.methods.base import METHOD_NAMES, Method, QuantContext, get_method, register_method

__all__ = ["METHOD_NAMES", "Method", "QuantContext", "get_method", "register_method"]
