"""FFN Fusion (Bercovich et al., arXiv 2503.18908): plans, fused checkpoints, analysis, evaluation.

- `plan`: which runs of attention-free FFN blocks to fuse (a small JSON file a person can edit).
- `fuse`: write an Ultra-style HF DeciLM checkpoint where each group is one wide FFN (Theorem 3.1).
- `analyze`: the paper's block-dependency matrix M on calibration text, and a heatmap.
- `evaluate`: perplexity, KL and top-1 agreement of a candidate against its base model.
"""
