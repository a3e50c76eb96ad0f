"""The ``extract features`` job: sentence feature files from one forward pass per batch.

For each batch of sentences (sorted by length, so little padding), one left-padded forward
pass with an attention mask and explicit position ids captures the embedding output (layer 0)
and every chosen layer at every token position through :class:`tracekit.models.LayerTaps`;
the pass stops after the last needed block (later blocks, the final norm and the LM head never
run). Each layer's states are encoded by that layer's SAE on the model's device, and each
sentence is written atomically as ``sentence_{row:06d}.npz`` (:mod:`tracekit.storage.sentences`).

Fragments are the sentence's own tokens: special tokens the tokenizer adds (a BOS) are fed to
the model, since it expects them, but not saved. Fragment j is the state at token j, which in a
causal model equals the last state of the prefix ending at token j (the "cumulative fragments").

Resumption: ``features.json`` records the settings; a rerun with the same settings skips
sentences whose file exists, a rerun with other settings is refused, and ``--force`` deletes the
old sentence files first, so one folder never mixes two runs.

Data-parallel (``--num-processes N``, ``accelerate launch``, ``torchrun``): the main process
checks and clears the folder and writes the manifest; every process then takes a contiguous
block of the sentences still to do (:meth:`tracekit.distributed.ProcessInfo.block`) and writes
their files. Files are per sentence, so there is nothing to merge; a crashed process's
sentences are simply still missing, and a rerun (any number of processes) does them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit import __version__
from tracekit.config.choices import SaeStorage
from tracekit.config.features import FeaturesConfig
from tracekit.errors import ConfigError, InputError, OutputExistsError
from tracekit.features.inputs import Sentences, read_sentences
from tracekit.sae.csr import take_csr_rows, to_csr
from tracekit.storage.atomic import output_lock, write_json
from tracekit.storage.sentences import (
    MANIFEST_NAME,
    SaeMeta,
    existing_sentence_files,
    sentence_file,
    write_sentence_file,
)

if TYPE_CHECKING:
    import torch

    from tracekit.distributed import ProcessInfo
    from tracekit.models.loading import LoadedModel
    from tracekit.sae.model import SparseAutoencoder

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as ``(sentences_just_done, total_to_do)``; first with 0 before any work."""

FRAGMENTS = "sentence tokens; special tokens added by the tokenizer are fed but not saved"


@dataclass
class FeaturesResult:
    """What a run did: counts, layers, SAE summary and throughput."""

    output: Path
    n_sentences: int
    written: int
    skipped: int
    layers: list[int]
    model: str
    seconds: float  # the whole call, model and SAE loading included
    extract_seconds: float  # tokenizing, forward passes, encoding and writing only
    tokens: int
    sae_width: int | None = None
    sae_storage: str | None = None
    average_l0s: list[float] | None = None
    sae_formats: list[str] = field(default_factory=list)
    model_label: str = ""
    """The model with its quantization and short weights hash, for the summary."""

    @property
    def sentences_per_second(self) -> float:
        return self.written / self.extract_seconds if self.extract_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        data["sentences_per_second"] = round(self.sentences_per_second, 3)
        return data


class _FileWriter:
    """Writes sentence files on a few threads, so disk time overlaps the next forward pass.

    Files are atomic, so a crash leaves whole files only; at most ``limit`` writes are queued,
    which bounds the memory held by pending arrays. The first failed write is re-raised.
    """

    def __init__(self, workers: int = 4, limit: int = 64) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tracekit-write")
        self._pending: deque[Future[None]] = deque()
        self._limit = limit

    def submit(self, path: Path, **arrays: Any) -> None:
        while len(self._pending) >= self._limit:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write_sentence_file, path, **arrays))

    def __enter__(self) -> _FileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            while self._pending:  # also on error: let started writes finish (they are atomic)
                future = self._pending.popleft()
                if exc_type is None:
                    future.result()
                else:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)


class _StopForward(Exception):
    """Raised by the last needed tap: the rest of the model's forward pass is not needed."""


@dataclass
class _Tokenized:
    ids: list[int]
    keep: list[bool]  # True at the sentence's own tokens (not special)

    @property
    def n_fragments(self) -> int:
        return sum(self.keep)


def _tokenize(tokenizer: Any, sentences: Sentences) -> list[_Tokenized]:
    encoded = tokenizer(
        sentences.texts, add_special_tokens=True, return_special_tokens_mask=True, padding=False
    )
    items: list[_Tokenized] = []
    for row, (ids, special) in enumerate(
        zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True), start=1
    ):
        item = _Tokenized(ids=list(ids), keep=[not s for s in special])
        if item.n_fragments == 0:
            raise InputError(f"sentence in row {row} has no tokens besides special tokens")
        items.append(item)
    return items


def _sae_layers(config: FeaturesConfig) -> list[int]:
    """The layers of an SAE run, known before the model loads (so SAE errors come first)."""
    from tracekit.sae.layout import default_sae_layers

    assert config.sae is not None
    if config.layers is None:
        return default_sae_layers(config.sae)
    if config.layers.is_all:
        raise ConfigError(
            "--layers all includes layer 0 (the embedding output), which has no SAE",
            "with --sae, leave --layers out (every layer the SAE folder has) or list layers >= 1",
        )
    return list(config.layers.layers)


def _check_layers(layers: list[int], n_layers: int, config: FeaturesConfig) -> None:
    bad = [layer for layer in layers if layer >= n_layers]
    if not bad:
        return
    if config.layers is None and config.sae is not None:
        raise InputError(
            f"{config.sae} has SAEs for tracekit layers up to {max(bad)}, but the model "
            f"has layers 0-{n_layers - 1}",
            "these SAEs belong to another model; choose --layers or another --sae",
        )
    shown = ", ".join(str(b) for b in bad[:5])
    raise ConfigError(f"--layers: layer(s) {shown} out of range: valid layers are 0-{n_layers - 1}")


def _load_saes(config: FeaturesConfig, layers: list[int]) -> dict[int, SparseAutoencoder]:
    from tracekit.sae.layout import load_saes

    assert config.sae is not None
    return load_saes(config.sae, layers, config.sae_width, config.sae_l0)


def _saes_for_model(
    saes: dict[int, SparseAutoencoder], hidden_size: int, device: torch.device
) -> dict[int, SparseAutoencoder]:
    for layer, sae in saes.items():
        if sae.d_in != hidden_size:
            raise InputError(
                f"SAE for tracekit layer {layer} (SAE release layer {layer - 1}) encodes "
                f"{sae.d_in}-wide vectors, but the model's hidden size is {hidden_size} "
                f"({sae.path})",
                "use SAEs trained on this model's residual stream",
            )
    return {layer: sae.to(device) for layer, sae in saes.items()}


def _settings(
    config: FeaturesConfig,
    loaded: LoadedModel,
    layers: list[int],
    saes: dict[int, SparseAutoencoder] | None,
    sentences: Sentences,
) -> dict[str, Any]:
    """What must match for a rerun to resume into the same folder."""
    return {
        **loaded.provenance(),
        "revision": loaded.revision,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "layers": layers,
        "fragments": FRAGMENTS,
        "text_column": config.text_column,
        "label_column": config.label_column,
        "n_sentences": len(sentences),
        "sentences_sha256": sentences.digest(),
        "sae_storage": config.sae_storage.value if saes else None,
        "saes": (
            [
                {"layer": layer, "release_layer": layer - 1, **sae.describe()}
                for layer, sae in saes.items()
            ]
            if saes
            else None
        ),
    }


def _prepare_output(output: Path, settings: dict[str, Any], force: bool) -> None:
    """Refuse to mix runs; with ``force`` clear the old run's files first."""
    import json

    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"--output {output} is a file", "give a folder path")
    manifest = output / MANIFEST_NAME
    existing = existing_sentence_files(output)
    if force:
        for path in existing:
            path.unlink()
        manifest.unlink(missing_ok=True)
        return
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8")).get("settings")
        except (OSError, ValueError, AttributeError):
            previous = None
        _check_previous_settings(output, previous, settings)
    elif existing:
        raise OutputExistsError(
            f"{output} already holds {len(existing)} sentence files from an unknown run",
            "pass --force to replace them, or choose another --output",
        )


def _check_previous_settings(output: Path, previous: Any, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``output`` whose manifest records ``previous`` settings other than
    ``settings``: other options, or other weights of the model. A manifest without the weights
    (an older tracekit's) resumes, with one notice."""
    from tracekit.models.weights import WEIGHTS_FIELDS, weights_mismatch, weights_unrecorded

    previous = previous if isinstance(previous, dict) else {}
    changed = sorted(
        key
        for key in set(settings) | set(previous)
        if key not in WEIGHTS_FIELDS and previous.get(key) != settings.get(key)
    )
    if changed or not previous:
        raise OutputExistsError(
            f"{output} holds features made with other settings "
            f"(differs in: {', '.join(changed) or 'unreadable manifest'})",
            "pass --force to redo them, or choose another --output",
        )
    mismatch = weights_mismatch(previous, settings, where=MANIFEST_NAME)
    if mismatch is not None:
        raise OutputExistsError(
            f"{output} holds features made with other weights of model "
            f"{settings.get('model')!r}: {mismatch}",
            "pass --force to redo them, or choose another --output",
        )
    if weights_unrecorded(previous) and not weights_unrecorded(settings):
        logger.warning(
            "%s does not record which weights of %s its features were made with (an older "
            "tracekit, or an unknown hash): resuming without that check",
            output,
            settings.get("model"),
        )


def _write_manifest(
    output: Path, settings: dict[str, Any], complete: bool, written: int, config: FeaturesConfig
) -> None:
    write_json(
        output / MANIFEST_NAME,
        {
            "kind": "tracekit sentence features",
            "tracekit_version": __version__,
            "settings": settings,
            "sentences": str(config.sentences),
            "complete": complete,
            "files": written,
        },
    )


def _batch_inputs(
    items: Sequence[_Tokenized], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask, position ids, and the flat ``[batch * width]`` indices
    of the kept positions (computed on the host, so taking them needs no device sync)."""
    import torch

    from tracekit.engines.interface import to_device

    width = max(len(item.ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    keep = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item.ids)
        ids[row, width - n :] = torch.tensor(item.ids)
        mask[row, width - n :] = 1
        keep[row, width - n :] = torch.tensor(item.keep)
    # positions count real tokens only, so a left-padded row sees the positions it would alone
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kept = keep.reshape(-1).nonzero().squeeze(1)
    return (
        to_device(ids, device),
        to_device(mask, device),
        to_device(positions, device),
        to_device(kept, device),
    )


def _capture(
    loaded: LoadedModel, items: Sequence[_Tokenized], capture_layers: list[int]
) -> dict[int, torch.Tensor]:
    """``{layer: [n_tokens_in_batch, d]}`` at the kept positions, rows in batch order."""
    import torch

    from tracekit.models.capture import LayerTaps

    pad_id = loaded.tokenizer.pad_token_id
    ids, mask, positions, kept = _batch_inputs(items, int(pad_id or 0), loaded.device)
    last = max(capture_layers)
    captured: dict[int, torch.Tensor] = {}

    def on_layer(layer: int, hidden: torch.Tensor) -> None:
        # index_select copies (later blocks cannot alias it) and, unlike a boolean mask, does
        # not wait for the device to learn how many rows it takes
        captured[layer] = hidden.flatten(0, 1).index_select(0, kept)
        if layer == last:
            raise _StopForward

    taps = LayerTaps(loaded.handles, capture_layers, on_layer)
    with torch.inference_mode(), taps, contextlib.suppress(_StopForward):
        loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    missing = [layer for layer in capture_layers if layer not in captured]
    if missing:  # a model whose blocks were skipped; never silently write zeros
        raise RuntimeError(f"layers {missing} were not captured in the forward pass")
    return captured


@dataclass
class _Batch:
    """A batch whose results are on their way to the host."""

    indices: list[int]
    items: list[_Tokenized]
    host: Callable[[], dict[str, Any]]
    """Waits for the copies; ``hidden``/``embeddings``/``activations`` numpy arrays and, for
    sparse storage, ``csr``."""


def _queue_batch(
    loaded: LoadedModel,
    items: Sequence[_Tokenized],
    capture_layers: list[int],
    layers: list[int],
    saes: dict[int, SparseAutoencoder] | None,
) -> dict[str, torch.Tensor]:
    """One batch's forward pass and SAE encoding, queued on the device (nothing waits):
    ``hidden`` ``[layers, tokens, d]`` and ``embeddings`` float32, ``activations``
    ``[layers, tokens, width]`` with SAEs."""
    import torch

    captured = _capture(loaded, items, capture_layers)
    arrays = {
        "hidden": torch.stack([captured[layer] for layer in layers]).float(),
        "embeddings": captured[0].float(),
    }
    if saes:
        encoded = [saes[layer].encode(captured[layer]) for layer in layers]
        arrays["activations"] = torch.stack(encoded)
    return arrays


def _start_copy(
    arrays: dict[str, torch.Tensor], sparse: bool, n_layers: int
) -> Callable[[], dict[str, Any]]:
    """Queue the copies of a batch's arrays to the host; returns the function that waits for
    them. Sparse activations become CSR on the device first (``nonzero`` waits for the batch:
    by then the previous batch's files have been written meanwhile)."""
    from tracekit.engines.interface import HostCopy

    csr = None
    if sparse:
        acts = arrays.pop("activations")
        csr = to_csr(acts.reshape(n_layers * acts.shape[1], -1))  # rows: (layer, token)
    copy = HostCopy(arrays, snapshot=False)  # the batch's own tensors

    def wait() -> dict[str, Any]:
        host: dict[str, Any] = {name: value.numpy() for name, value in copy.wait().items()}
        host["csr"] = csr
        return host

    return wait


def _write_batch(run: _Run, batch: _Batch, writer: _FileWriter) -> int:
    """Submit one file per sentence of ``batch``; returns the tokens (fragments) written."""
    host = batch.host()
    hidden_np, embeddings_np = host["hidden"], host["embeddings"]
    acts_np, csr = host.get("activations"), host["csr"]
    n_batch = embeddings_np.shape[0]  # kept tokens of the whole batch
    offset = 0
    for index, item in zip(batch.indices, batch.items, strict=True):
        n = item.n_fragments
        rows = slice(offset, offset + n)
        sparse = None
        if csr is not None:  # this sentence's rows of every layer, layer-major
            ranges = [
                (lp * n_batch + offset, lp * n_batch + offset + n) for lp in range(len(run.layers))
            ]
            sparse = take_csr_rows(csr, ranges)
        writer.submit(
            sentence_file(run.config.output, index),
            embeddings=embeddings_np[rows],
            hidden_states=hidden_np[:, rows],
            layers=run.layers,
            label=run.sentences.labels[index],
            sentence=run.sentences.texts[index],
            tokens=_token_strings(run.loaded.tokenizer, item),
            model=run.loaded.name,
            weights=run.loaded.provenance(),
            sae=run.sae_meta,
            activations=None if acts_np is None else acts_np[:, rows],
            sparse=sparse,
        )
        offset += n
    return offset


def _sae_meta(saes: dict[int, SparseAutoencoder], layers: list[int], storage: str) -> SaeMeta:
    known = any(sae.average_l0 is not None for sae in saes.values())
    return SaeMeta(
        width=next(iter(saes.values())).width,
        # an unknown L0 is NaN; with none known the array is left out (readers: "not recorded")
        average_l0s=[saes[layer].average_l0_or_nan for layer in layers] if known else None,
        release_layers=[layer - 1 for layer in layers],
        formats=",".join(sorted({sae.format for sae in saes.values()})),
        storage=storage,
    )


def _token_strings(tokenizer: Any, item: _Tokenized) -> list[str]:
    kept = [tok for tok, keep in zip(item.ids, item.keep, strict=True) if keep]
    return [str(text) for text in tokenizer.batch_decode([[tok] for tok in kept])]


def extract_features(
    config: FeaturesConfig,
    *,
    loaded: LoadedModel | None = None,
    on_progress: ProgressCallback | None = None,
) -> FeaturesResult:
    """Write one feature file per sentence of ``config.sentences`` into ``config.output``.

    ``loaded`` reuses an already loaded model (then ``config.model``/``dtype``/``device`` are
    not consulted). Everything is checked (CSV, layers, SAEs against the model) before the first
    file is written. Holds the output folder's one-writer lock (the main process of a
    data-parallel run).
    """
    from tracekit.distributed import process_info

    if config.output.exists() and not config.output.is_dir():
        raise OutputExistsError(f"--output {config.output} is a file", "give a folder path")
    with output_lock(config.output) if process_info().is_main else contextlib.nullcontext():
        return _extract_features(config, loaded, on_progress)


@dataclass
class _Run:
    """What the steps of one run share: its settings, sentences, model, layers and SAEs."""

    config: FeaturesConfig
    info: ProcessInfo
    sentences: Sentences
    loaded: LoadedModel
    layers: list[int]
    saes: dict[int, SparseAutoencoder] | None
    """On the model's device; None without ``--sae``."""
    sae_meta: SaeMeta | None


def _extract_features(
    config: FeaturesConfig, loaded: LoadedModel | None, on_progress: ProgressCallback | None
) -> FeaturesResult:
    from tracekit.distributed import all_gather

    started = time.perf_counter()
    run = _start_run(config, loaded)
    extract_started = time.perf_counter()
    tokenized = _tokenize(run.loaded.tokenizer, run.sentences)
    settings = _settings(config, run.loaded, run.layers, run.saes, run.sentences)
    pending, skipped = _claim_pending(run, settings)
    if on_progress is not None:
        on_progress(0, len(pending))
    written, tokens = _write_features(run, tokenized, pending, on_progress)
    if run.info.distributed:  # returns once every process wrote its block
        counts = all_gather(run.info, (written, tokens))
        written, tokens = sum(c[0] for c in counts), sum(c[1] for c in counts)
    n_sentences = len(run.sentences)
    if run.info.is_main:
        _write_manifest(config.output, settings, complete=True, written=n_sentences, config=config)
    sae_meta = run.sae_meta
    return FeaturesResult(
        output=config.output,
        n_sentences=n_sentences,
        written=written,
        skipped=skipped,
        layers=run.layers,
        model=run.loaded.name,
        model_label=run.loaded.label,
        seconds=time.perf_counter() - started,
        extract_seconds=time.perf_counter() - extract_started,
        tokens=tokens,
        sae_width=sae_meta.width if sae_meta else None,
        sae_storage=sae_meta.storage if sae_meta else None,
        average_l0s=sae_meta.average_l0s if sae_meta else None,
        sae_formats=sorted({sae.format for sae in run.saes.values()}) if run.saes else [],
    )


def _start_run(config: FeaturesConfig, loaded: LoadedModel | None) -> _Run:
    """Read the sentences, load the SAEs and the model, and check them against each other:
    everything that can fail before the first file is written."""
    from tracekit.distributed import process_info, process_model_config
    from tracekit.models.loading import load_model

    info = process_info()
    sentences = read_sentences(
        config.sentences, config.text_column, config.label_column, config.label_range
    )
    saes = None
    if config.sae is not None:
        layers = _sae_layers(config)
        saes = _load_saes(config, layers)  # on the CPU: a bad SAE fails before the model loads
    loaded = loaded or load_model(process_model_config(config.to_model_config(), info))
    if saes is None:
        if config.layers is None:
            layers = list(range(loaded.n_layers))
        else:
            try:
                layers = list(config.layers.resolve(loaded.n_layers))
            except ValueError as exc:
                raise ConfigError(f"--layers: {exc}") from None
    _check_layers(layers, loaded.n_layers, config)
    if saes is not None:
        saes = _saes_for_model(saes, loaded.hidden_size, loaded.device)
    sae_meta = _sae_meta(saes, layers, config.sae_storage.value) if saes else None
    return _Run(config, info, sentences, loaded, layers, saes, sae_meta)


def _claim_pending(run: _Run, settings: dict[str, Any]) -> tuple[list[int], int]:
    """Prepare the output folder and take this process's block of the sentences whose file is
    still missing; returns that block and how many sentences were already written."""
    from tracekit.distributed import barrier

    info, output, n_sentences = run.info, run.config.output, len(run.sentences)
    if info.is_main:  # data-parallel: the main process checks and clears, the others wait
        _prepare_output(output, settings, run.config.force)
    barrier(info)
    pending = [i for i in range(n_sentences) if not sentence_file(output, i).is_file()]
    skipped = n_sentences - len(pending)
    if skipped and info.is_main:
        logger.info("resuming: %d of %d sentence files already written", skipped, n_sentences)
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _write_manifest(output, settings, complete=False, written=skipped, config=run.config)
    # every process has read the same pending list before any of them writes a file; each
    # takes a contiguous block of it (sentence files are per row: nothing to merge)
    barrier(info)
    return info.block(pending, multiple=run.config.batch_size), skipped


def _write_features(
    run: _Run,
    tokenized: list[_Tokenized],
    pending: list[int],
    on_progress: ProgressCallback | None,
) -> tuple[int, int]:
    """Write the files of the sentences ``pending``; returns the sentences and the tokens
    written."""
    batch_size = run.config.batch_size
    capture_layers = sorted({0, *run.layers})
    # similar lengths -> little padding
    ordered = sorted(pending, key=lambda i: len(tokenized[i].ids))
    sparse = bool(run.saes) and run.config.sae_storage is SaeStorage.sparse
    written = tokens = 0

    def write(batch: _Batch) -> None:
        nonlocal written, tokens
        tokens += _write_batch(run, batch, writer)
        written += len(batch.indices)
        if on_progress is not None:
            on_progress(len(batch.indices), len(pending))

    # one batch in flight: batch i's forward pass runs on the device while the host turns
    # batch i-1 into files (its copies were queued behind its own work, so they have landed)
    with _FileWriter() as writer:
        previous: _Batch | None = None
        for start in range(0, len(ordered), batch_size):
            indices = ordered[start : start + batch_size]
            items = [tokenized[i] for i in indices]
            arrays = _queue_batch(run.loaded, items, capture_layers, run.layers, run.saes)
            if previous is not None:
                write(previous)
            previous = _Batch(indices, items, _start_copy(arrays, sparse, len(run.layers)))
        if previous is not None:
            write(previous)
    return written, tokens
