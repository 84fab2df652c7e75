"""Quantization-aware neural architecture search: search spaces, strategies, evaluators, supernets.

Layout follows NNI's split: ``spaces/`` (what an architecture is), ``strategies/`` (how to search),
evaluators (how an architecture is scored: tabular ground truth or a trained supernet).
Architectures are plain tuples/dicts/strings so they serialise into params, MLflow and JSON.
"""
