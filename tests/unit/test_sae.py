"""SAE loading and encoding: both on-disk formats against numpy references, and every error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tolerance import assert_close_to_scale
from tracekit.errors import InputError
from tracekit.sae import (
    choose_saes,
    load_gemma_scope,
    load_sae,
    load_saelens,
    load_saes,
    parse_l0_choice,
    parse_width,
    release_layer,
    tracekit_layer,
)

_spec = importlib.util.spec_from_file_location(
    "make_example_saes", Path(__file__).resolve().parents[2] / "examples" / "make_example_saes.py"
)
assert _spec and _spec.loader
saes_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(saes_example)

D_IN, WIDTH = 48, 64


def reference_encode(x, params, activation, k=None, apply_b_dec=False):
    """The formats' published encoders, in float64 numpy."""
    x = x.astype(np.float64)
    if apply_b_dec:
        x = x - params["b_dec"]
    pre = x @ params["W_enc"].astype(np.float64) + params["b_enc"]
    if activation == "relu":
        return np.maximum(pre, 0.0)
    if activation == "jumprelu":
        return np.where(pre > params["threshold"], np.maximum(pre, 0.0), 0.0)
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, 1), 0.0), axis=1)
    return out


@pytest.fixture()
def x():
    return np.random.default_rng(7).standard_normal((20, D_IN)).astype(np.float32)


def encode(sae, x):
    return sae.encode(torch.from_numpy(x)).numpy()


def test_gemma_scope_encodes_like_reference_and_reads_l0_from_folder(tmp_path, x):
    params = saes_example.random_sae(D_IN, WIDTH, seed=1)
    params["threshold"] = np.abs(np.random.default_rng(2).normal(0.3, 0.2, WIDTH)).astype("f4")
    path = saes_example.write_gemma_scope(tmp_path, 4, params, average_l0=37)
    sae = load_gemma_scope(path)
    assert (sae.d_in, sae.width, sae.activation, sae.average_l0) == (D_IN, WIDTH, "jumprelu", 37)
    acts = encode(sae, x)
    expected = reference_encode(x, params, "jumprelu")
    assert_close_to_scale(acts, expected)
    assert 0 < (acts > 0).mean() < 1  # the threshold really cut something
    # Gemma Scope does not subtract b_dec before encoding
    assert not np.allclose(acts, reference_encode(x, params, "jumprelu", apply_b_dec=True))


@pytest.mark.parametrize(
    ("activation", "k", "apply_b_dec"),
    [("relu", None, True), ("relu", None, False), ("jumprelu", None, True), ("topk", 5, True)],
)
def test_saelens_encodes_like_reference(tmp_path, x, activation, k, apply_b_dec):
    params = saes_example.random_sae(D_IN, WIDTH, seed=3)
    params["b_dec"] = np.random.default_rng(4).standard_normal(D_IN).astype("f4")
    folder = saes_example.write_saelens(tmp_path, 2, params, activation, k, apply_b_dec)
    sae = load_saelens(folder)
    assert sae.activation == activation and sae.width == WIDTH
    acts = encode(sae, x)
    assert_close_to_scale(acts, reference_encode(x, params, activation, k, apply_b_dec))
    if activation == "topk":
        assert sae.average_l0 == k
        assert ((acts > 0).sum(axis=1) <= k).all() and (acts > 0).sum(axis=1).max() == k
    else:
        assert sae.average_l0 is None  # SAELens configs do not state it


def test_saelens_v5_config_and_log_threshold(tmp_path, x):
    """Older configs: hook_name at the top, activation_fn_str + kwargs; log_threshold weights."""
    from safetensors.numpy import save_file

    params = saes_example.random_sae(D_IN, WIDTH, seed=5)
    folder = tmp_path / "topk_v5"
    folder.mkdir()
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": WIDTH,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": False,
        "hook_name": "blocks.2.hook_resid_post",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: params[k] for k in ("W_enc", "b_enc", "b_dec")}, folder / "sae_weights.safetensors"
    )
    sae = load_sae(folder)
    assert (sae.activation, sae.k, sae.hook_name) == ("topk", 3, "blocks.2.hook_resid_post")
    assert_close_to_scale(encode(sae, x), reference_encode(x, params, "topk", 3))

    jump = tmp_path / "jump"
    jump.mkdir()
    (jump / "cfg.json").write_text(
        json.dumps({"architecture": "jumprelu", "d_in": D_IN, "d_sae": WIDTH})
    )
    save_file(
        {
            **{k: params[k] for k in ("W_enc", "b_enc", "b_dec")},
            "log_threshold": np.log(params["threshold"]),
        },
        jump / "sae_weights.safetensors",
    )
    assert_close_to_scale(
        encode(load_sae(jump), x), reference_encode(x, params, "jumprelu", apply_b_dec=True)
    )


def test_corrupt_and_incomplete_files_are_one_clear_error(tmp_path):
    params = saes_example.random_sae(D_IN, WIDTH, seed=1)
    bad_npz = tmp_path / "gs" / "params.npz"
    bad_npz.parent.mkdir()
    bad_npz.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(InputError, match=r"cannot read SAE file .*params\.npz"):
        load_gemma_scope(bad_npz)

    incomplete = tmp_path / "incomplete.npz"
    np.savez(incomplete, W_enc=params["W_enc"], b_enc=params["b_enc"], b_dec=params["b_dec"])
    with pytest.raises(InputError, match=r"lacks threshold"):
        load_gemma_scope(incomplete)

    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, **{**params, "b_enc": params["b_enc"][:10]})
    with pytest.raises(InputError, match=r"b_enc has shape \(10,\), expected \(64,\)"):
        load_gemma_scope(mismatched)

    folder = saes_example.write_saelens(tmp_path / "sl", 0, params, "relu")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(InputError, match=r"cannot read SAE file .*sae_weights\.safetensors"):
        load_saelens(folder)

    folder = saes_example.write_saelens(tmp_path / "sl2", 0, params, "relu")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 999}))
    with pytest.raises(InputError, match=r"cfg.json says d_sae=999 but W_enc is \[48, 64\]"):
        load_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(InputError, match=r"architecture 'gated' .* is not supported"):
        load_saelens(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(InputError, match=r"cannot read SAE config"):
        load_saelens(folder)


def test_layer_mapping_and_option_parsing():
    assert release_layer(1) == 0 and tracekit_layer(0) == 1 and release_layer(13) == 12
    with pytest.raises(ValueError, match="layer 0 is the embedding output"):
        release_layer(0)
    assert parse_width("16k") == 16384 and parse_width("1m") == 2**20 and parse_width("96") == 96
    with pytest.raises(ValueError, match="invalid SAE width"):
        parse_width("wide")
    assert parse_l0_choice("100") == (100.0, {})
    assert parse_l0_choice("100, 12:82") == (100.0, {12: 82.0})
    with pytest.raises(ValueError, match="invalid --sae-l0 item 'x'"):
        parse_l0_choice("x")


@pytest.fixture()
def gemma_scope_release(tmp_path):
    """Release layers 0-2; layer 1 has two widths and three L0s at width 64, layer 2 width 128."""
    root = tmp_path / "gemma-scope"
    layouts = [(0, 64, 20), (1, 64, 10), (1, 64, 40), (1, 64, 90), (1, 128, 50), (2, 128, 30)]
    for layer, width, l0 in layouts:
        saes_example.write_gemma_scope(root, layer, saes_example.random_sae(D_IN, width, l0), l0)
    return root


def test_gemma_scope_layout_choices(gemma_scope_release):
    root = gemma_scope_release
    with pytest.raises(
        InputError, match=r"several widths for tracekit layer 2 \(SAE release layer 1\)"
    ):
        choose_saes(root, [1, 2])
    with pytest.raises(
        InputError, match=r"holds 3 SAEs for tracekit layer 2 .*average L0: 10, 40, 90"
    ):
        choose_saes(root, [2], width=64)
    picked = choose_saes(root, [1, 2], width=64, l0="50")
    assert picked[1].path.parent.name == "average_l0_20"  # the only one at release layer 0
    assert picked[2].path.parent.name == "average_l0_40"  # |40-50| < |90-50|
    picked = choose_saes(root, [2], width=64, l0="50,1:90")
    assert picked[2].path.parent.name == "average_l0_90"
    assert choose_saes(root, [2], width=128)[2].path.parent.name == "average_l0_50"
    with pytest.raises(InputError, match=r"no SAE of width 32 for tracekit layer 2"):
        choose_saes(root, [2], width=32)
    with pytest.raises(InputError, match=r"no SAE for tracekit layer 5 \(SAE release layer 4\)"):
        choose_saes(root, [5], width=64)
    with pytest.raises(InputError, match=r"tracekit layer 0 \(the embedding output\) has no SAE"):
        choose_saes(root, [0, 1])
    with pytest.raises(InputError, match=r"--sae-l0 names release layer\(s\) 7"):
        choose_saes(root, [1], l0="7:10")
    with pytest.raises(
        InputError, match=r"the chosen SAEs differ in width \(layer 1: 64, layer 3: 128\)"
    ):
        load_saes(root, [1, 3])
    saes = load_saes(root, [1, 2], width=64, l0="40")
    assert {layer: sae.average_l0 for layer, sae in saes.items()} == {1: 20, 2: 40}


def test_saelens_layout_checks_the_hook_against_the_folder(tmp_path):
    params = saes_example.random_sae(D_IN, WIDTH, seed=9)
    root = tmp_path / "saelens"
    saes_example.write_saelens(root, 3, params, "relu")  # blocks.3.hook_resid_post
    saes_example.write_saelens(root, 4, params, "relu", hook_name="blocks.5.hook_resid_pre")
    saes_example.write_saelens(root, 5, params, "relu", hook_name="blocks.5.hook_resid_pre")
    saes_example.write_saelens(root, 6, params, "relu", hook_name="blocks.6.hook_mlp_out")
    saes = load_saes(root, [4, 5])  # resid_pre of block 5 == resid_post of block 4
    assert saes[4].format == "saelens" and saes[5].hook_name == "blocks.5.hook_resid_pre"
    with pytest.raises(
        InputError, match=r"trained on blocks.5.hook_resid_pre \(tracekit layer 5\)"
    ):
        load_saes(root, [6])
    with pytest.raises(InputError, match=r"not on the residual stream"):
        load_saes(root, [7])
    with pytest.raises(InputError, match=r"has no layer_N folders"):
        load_saes(tmp_path, [1])
