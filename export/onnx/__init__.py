"""ONNX export of the heterogeneous decoder, and an ONNX Runtime backend for the runtime's steps.

`graph.py` builds the decoder graph from the `ModelSpec` with `onnx.helper` (KV inputs/outputs only
for full-attention layers), `external.py` streams the weights into one external-data file,
`export.py` writes engines/NAME/onnx/ and records it in the manifest, `backend.py` runs the graph
with ONNX Runtime behind the same step protocol as the PyTorch runtime, `tensorrt.py` states the
TensorRT profile and commands for GPU hosts (not run here).
"""
