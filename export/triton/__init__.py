"""Triton deployment: render a model repository, run a real tritonserver, query it.

`package.package_repo` renders `triton_repo/` for an engine dir, `server.start_server` runs
tritonserver (NVIDIA's, or the binary bundled in the nvidia-pytriton wheel) and `client.query`
sends one prompt over gRPC streaming or HTTP generate.
"""
