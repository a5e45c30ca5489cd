"""FFN-Fusion toolkit: Ultra-style checkpoints to TensorRT-LLM engines behind Triton.

Stages: inspect -> analyze -> fuse -> convert -> build -> package -> serve -> query.
Every stage reads one model description (`export.spec.ModelSpec`).
"""

__version__ = "0.1.0"
