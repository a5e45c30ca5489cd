"""The reference runtime: the heterogeneous decoder in PyTorch, KV cache, sampling, and a tp x pp engine.

Every exported artifact is checked by running it here, so this package favours plain, readable
torch over speed; the in-process tp=1 path stays allocation-light so it is also usable for demos.
"""
