"""TensorRT-LLM export: DeciLM (`nemotron-nas`) checkpoints as TP/PP-sharded TRT-LLM checkpoints.

The contract is shared/reference/trtllm-checkpoint.md (TensorRT-LLM <= 1.3.0rc20, the last
releases with the TensorRT engine path). Modules: `names` (HF role -> TRT-LLM name table),
`config` (config.json writer/reader), `plan` (every rank file's tensors and where each source
piece lands), `convert` (the one-pass streaming writer), `weights` (reads rank files back for the
reference runtime), `build` (trtllm-build); `verify` (logits parity through the runtime) is `export.checks.verify`.
"""
