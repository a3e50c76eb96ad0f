"""The transformers-version shims: the KV-cache keyword and output field under both names."""

from __future__ import annotations

from types import SimpleNamespace

from tracekit.models.compat import cache_kwarg, output_cache


class NewStyle:
    def forward(self, input_ids=None, cache=None, use_cache=None): ...


class OldStyle:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...


def test_cache_kwarg_follows_the_forward_signature():
    assert cache_kwarg(NewStyle()) == "cache"
    assert cache_kwarg(OldStyle()) == "past_key_values"


def test_output_cache_reads_either_field():
    new, old = object(), object()
    assert output_cache(SimpleNamespace(cache=new, past_key_values=None)) is new
    assert output_cache(SimpleNamespace(past_key_values=old)) is old
    assert output_cache(SimpleNamespace(cache=None, past_key_values=old)) is old
    assert output_cache(SimpleNamespace(logits=1)) is None
