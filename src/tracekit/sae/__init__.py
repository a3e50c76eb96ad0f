"""Sparse autoencoders from local folders (Gemma Scope, SAELens) and encoding with them.

Nothing here touches the network. See :mod:`tracekit.sae.layout` for the ``--sae DIR`` layouts
and the one mapping between SAE-release layer numbers and tracekit layers (tracekit = release + 1).
"""

from tracekit.sae.formats import average_l0_from_path, load_gemma_scope, load_sae, load_saelens
from tracekit.sae.layout import (
    SaeChoice,
    choose_saes,
    default_sae_layers,
    load_saes,
    parse_l0_choice,
    parse_width,
    release_layer,
    tracekit_layer,
)
from tracekit.sae.model import SparseAutoencoder

__all__ = [
    "SaeChoice",
    "SparseAutoencoder",
    "average_l0_from_path",
    "choose_saes",
    "default_sae_layers",
    "load_gemma_scope",
    "load_sae",
    "load_saelens",
    "load_saes",
    "parse_l0_choice",
    "parse_width",
    "release_layer",
    "tracekit_layer",
]
