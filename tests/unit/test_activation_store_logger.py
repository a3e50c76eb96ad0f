"""ActivationLogger on a tiny random-init Llama (no download): positions, modes, misuse."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tolerance import assert_close_to_scale
from tracekit.actlog.logger import ActivationLogger
from tracekit.storage.activation_store import open_store


class _Vocab:
    """Just what the provenance fingerprint reads from a tokenizer."""

    chat_template = None
    special_tokens_map = {"eos_token": "</s>"}

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(32)}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


# two rows: prompt lengths 2 and 4 (left padded to 4), responses of 3 and 1 tokens
PROMPT_IDS = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
PROMPT_MASK = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
RESPONSES = [[11, 12, 13], [14]]


def _teacher_forced(model) -> None:
    resp = torch.tensor([[11, 12, 13], [14, 0, 0]])
    resp_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ids = torch.cat([PROMPT_IDS, resp], dim=1)
    mask = torch.cat([PROMPT_MASK, resp_mask], dim=1)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


def _unpadded(model, ids: list[int], layer: int) -> np.ndarray:
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0].numpy()


@pytest.mark.parametrize(
    ("mode", "positions"),
    [("all", [(2, 3), (4, 1)]), ("prompt", [(2, 0), (4, 0)]), ("response", [(0, 3), (0, 1)])],
)
def test_sequence_modes_store_the_right_positions(tiny, tmp_path: Path, mode, positions):
    store = tmp_path / "s.lmdb"
    with ActivationLogger(
        store, tiny, _Vocab(), layers=[0, 1], sequence_mode=mode, dtype="float32"
    ) as act_log:
        _teacher_forced(tiny)
        act_log.log(["p0", "p1"], PROMPT_MASK, RESPONSES, ["g0", "g1"], [{"x": 0}, {"x": 1}])
    full = [[5, 6, *RESPONSES[0]], [7, 8, 9, 10, *RESPONSES[1]]]
    with open_store(store) as reader:
        for row, (n_prompt, n_resp) in enumerate(positions):
            entry = reader.get_by_prompt(f"p{row}")
            assert entry.metadata["positions"] == {"prompt": n_prompt, "response": n_resp}
            assert entry.metadata["generation"] == f"g{row}" and entry.metadata["x"] == row
            assert entry.metadata["input_length"] == [2, 4][row]
            plen = [2, 4][row]
            start = plen - n_prompt
            for layer in (0, 1):
                expected = _unpadded(tiny, full[row], layer)[start : plen + n_resp]
                assert_close_to_scale(entry.arrays[f"layer_{layer}"], expected)


def test_default_layer_is_the_last_and_paused_forwards_are_not_captured(tiny, tmp_path: Path):
    hooks_before = len(tiny.model.layers[1]._forward_hooks)
    with ActivationLogger(tmp_path / "s.lmdb", tiny, _Vocab()) as act_log:
        assert act_log.layers == (2,)
        assert len(tiny.model.layers[1]._forward_hooks) == hooks_before + 1
        with act_log.paused():
            _teacher_forced(tiny)
        with pytest.raises(ValueError, match="no forward pass was captured"):
            act_log.log(["p0", "p1"], PROMPT_MASK, RESPONSES)
        _teacher_forced(tiny)
        act_log.log(["p0", "p1"], PROMPT_MASK, RESPONSES)
        assert len(act_log.existing_keys()) == 2
    with open_store(tmp_path / "s.lmdb") as reader:
        assert reader.get_by_prompt("p0").arrays["layer_2"].dtype == np.float16  # default dtype
    assert len(tiny.model.layers[1]._forward_hooks) == hooks_before  # removed on exit


def test_misuse_is_refused(tiny, tmp_path: Path):
    act_log = ActivationLogger(tmp_path / "s.lmdb", tiny, _Vocab())
    with pytest.raises(RuntimeError, match="outside its 'with' block"):
        act_log.log(["p"], torch.ones(1, 2))
    with pytest.raises(ValueError, match="sequence_mode must be one of"):
        ActivationLogger(tmp_path / "s.lmdb", tiny, _Vocab(), sequence_mode="tokens")  # type: ignore[arg-type]
    with act_log:
        _teacher_forced(tiny)
        with pytest.raises(ValueError, match="right-padded"):
            act_log.log(["p0", "p1"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
        _teacher_forced(tiny)
        with pytest.raises(ValueError, match="1 prompts for a batch of 2 rows"):
            act_log.log(["p0"], PROMPT_MASK)
        with pytest.raises(ValueError, match="no forward pass was captured"):  # nothing leaked
            act_log.log(["p0", "p1"], PROMPT_MASK)
        _teacher_forced(tiny)
        with pytest.raises(ValueError, match="the captured forward had 2 rows, the mask 1"):
            act_log.log(["p0"], PROMPT_MASK[:1])
