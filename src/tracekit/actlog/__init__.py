"""Activation logging (``tracekit log``) and inference-JSONL reconstruction (``reconstruct``).

Modules: ``prompts`` (QA input, templates, keys), ``logger`` (:class:`ActivationLogger` for any
HF model), ``job`` (the ``log`` job), ``reconstruct`` (the ``reconstruct`` job). The on-disk
format lives in :mod:`tracekit.storage.activation_store`. Nothing here imports torch at import
time.
"""
