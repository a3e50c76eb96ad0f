"""Activation logging (``tracekit log``): QA input and templates (``prompts``) and the
:class:`ActivationLogger` for any HF model (``logger``). The jobs are :mod:`tracekit.jobs.log`
and :mod:`tracekit.jobs.reconstruct`; the on-disk format lives in
:mod:`tracekit.storage.activation_store`. Nothing here imports torch at import time.
"""
