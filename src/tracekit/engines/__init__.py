"""Batched, padding-correct generation behind one engine interface, and pooled capture.

Import from the submodules (``engine``, ``pooling``, ``hf_engine``, ``teacher_forced``); this
package does not import torch at import time.
"""
