"""Post-training FP8 (`python -m export quantize`): calibrate a bf16/fp32 checkpoint on the
reference runtime and write it in ModelOpt's per-tensor FP8 HF format (docs/fp8.md).

`calibrate` turns observed amaxes into the checkpoint's scales; `checkpoint` validates the
inputs, streams the FP8 checkpoint out and scores it against the source on held-out text.
"""
