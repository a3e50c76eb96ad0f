"""Trait vectors from pos/neg activations (``mean_diff``) and per-layer separation."""
