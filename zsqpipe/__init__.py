"""zsqpipe: zero-shot quantization and quantization-aware NAS experiments as a Snakemake + MLflow pipeline.

The library layers (``zsqpipe.quant``, ``zsqpipe.models``, ``zsqpipe.data``) know nothing of Snakemake, MLflow or
click and can be imported from a notebook. ``zsqpipe.stages`` holds one pure function per pipeline stage and
``zsqpipe.cli`` the thin click wrappers that Snakemake rules call.
"""

__version__ = "0.1.0"
