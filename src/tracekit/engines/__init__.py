"""Generation engines behind one interface (:mod:`tracekit.engines.interface`), and capture.

``hf`` runs every causal LM through a plain PyTorch decode loop; ``cuda``
(:mod:`tracekit.engines.cuda`) is the fast path for the architectures it knows;
``teacher_forced`` pools the states of given texts; ``pooling`` defines the poolings. Import
from the submodules; this package does not import torch at import time.
"""
