"""docs/log.md's ~20-line store reader (lmdb + numpy only), taken from the page itself so the
doc cannot drift, reads a real store exactly as tracekit's reader does and rejects a value whose
payload does not match its CRC."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tracekit.storage.activation_store import (
    ActivationStoreWriter,
    PendingEntry,
    open_store,
    prompt_key,
)

DOC = Path(__file__).parents[2] / "docs" / "log.md"
PROV = {"model": "org/model-a", "layers": [1, 2, 3], "sequence_mode": "all", "dtype": "float16"}


def doc_reader():
    text = DOC.read_text(encoding="utf-8")
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "def read_store" in b
    ]
    assert len(blocks) == 1, "docs/log.md should hold exactly one read_store block"
    assert len(blocks[0].splitlines()) <= 32  # "about 20 lines" of reader
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    return namespace["read_store"]


def entry(prompt: str, rows: int, seed: int) -> PendingEntry:
    rng = np.random.default_rng(seed)
    return PendingEntry(
        prompt_key(prompt),
        {"prompt": prompt, "generation": f"gen {seed}", "input_length": rows},
        {  # odd widths: the 16-byte padding between arrays is exercised
            "layer_1": rng.standard_normal((rows, 5)).astype(np.float16),
            "layer_2": torch.randn(rows, 3, generator=torch.Generator().manual_seed(seed)).to(
                torch.bfloat16
            ),
            "layer_3": rng.standard_normal((rows, 7)).astype(np.float32),
        },
    )


def test_doc_reader_matches_tracekit_reader_on_a_real_store(tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    prompts = ["Q: one\nA:", "Q: two\nA:", "Q: empty\nA:"]
    with ActivationStoreWriter(path, PROV) as writer:
        writer.write_batch(
            [entry(p, rows, i) for i, (p, rows) in enumerate(zip(prompts, [3, 1, 0], strict=True))]
        )
    read_store = doc_reader()
    got = {key: (meta, arrays) for key, meta, arrays in read_store(path)}
    assert sorted(got) == sorted(prompt_key(p) for p in prompts)
    with open_store(path) as store:
        for prompt in prompts:
            want = store.get_by_prompt(prompt)
            meta, arrays = got[prompt_key(prompt)]
            assert meta == want.metadata and meta["prompt"] == prompt
            assert sorted(arrays) == sorted(want.arrays)
            for name, array in arrays.items():
                assert array.dtype == np.asarray(want.arrays[name]).dtype, name
                assert np.array_equal(array, np.asarray(want.arrays[name])), name


def test_doc_reader_checks_the_crc_over_the_payload(tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, PROV) as writer:
        writer.write_batch([entry("Q: x\nA:", 2, 0)])
        key = prompt_key("Q: x\nA:").encode()
        with writer.env.begin(write=True) as txn:
            db = writer.env.open_db(b"activations", txn=txn)
            value = bytearray(txn.get(key, db=db))
            value[-1] ^= 0xFF  # last byte of the last array: inside the CRC's span
            txn.put(key, bytes(value), db=db)
    with pytest.raises(ValueError, match="does not match its CRC32"):
        list(doc_reader()(path))
