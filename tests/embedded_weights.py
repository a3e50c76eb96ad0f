"""What the embedded model's provenance must say, computed here from first principles: the
packaged GGUF file's SHA-256 (read and hashed by the test itself) and its quantization."""

import hashlib
from functools import cache


@cache
def embedded_weights() -> dict[str, str]:
    from tracekit.models.embedded import find_embedded_gguf

    digest = hashlib.sha256(find_embedded_gguf().read_bytes()).hexdigest()
    return {"quantization": "Q4_1 GGUF, de-quantized to float32", "weights_sha256": digest}
