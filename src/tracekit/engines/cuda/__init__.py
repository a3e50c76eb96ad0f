"""The fast CUDA engine: static KV cache, CUDA-graph decode steps, sampling on the device.

Import from the submodules; this package does not import torch at import time.
"""
