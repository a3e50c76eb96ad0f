"""Generation engines behind one interface (:mod:`tracekit.engines.interface`), and pooled capture.

``hf`` runs every causal LM through Hugging Face ``generate``; ``cuda``
(:mod:`tracekit.engines.cuda`) is the fast path for the architectures it knows; ``teacher_forced`` pools the states of given
texts. Import from the submodules; this package does not import torch at import time.
"""
