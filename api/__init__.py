"""The gateway (FastAPI) and the `gpuhost` command line.

Imports `billing` and `workers.contract`; never model code or torch.
"""
