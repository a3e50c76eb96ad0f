"""The fast path's Triton kernels, one file per operation: the launcher and its custom op in
``<op>.py``, the Triton source in ``_<op>_kernel.py`` (imported only where Triton is, so the
rest of tracekit imports without it; Triton resolves a kernel's helpers through its module's
globals, hence a module of its own)."""
