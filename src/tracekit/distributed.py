"""Data-parallel runs: which process am I, which rows are mine, and launching N processes.

A run is data-parallel when it was started by ``accelerate launch`` or ``torchrun`` (the
``WORLD_SIZE`` environment variable is above 1), or by a verb's ``--num-processes N``, which
starts ``python -m torch.distributed.run --standalone --nproc-per-node N -m tracekit VERB
--config <resolved options>`` (offline, any device; gloo on CPU, nccl on CUDA). Each process
loads the model, takes its shard of the rows, journals its own batches, and the main process
(rank 0) merges every shard into exactly the files a single-process run writes.

Sharding is by **contiguous blocks** of the rows still to do, cut at multiples of the batch
size (:meth:`ProcessInfo.block`): process ``r`` of ``n`` runs the ``r``-th block, so its batches
are batches a single process would run. ``generate`` blocks the rows not yet journaled (every
process reads the same journal, so all agree on them); ``extract`` and ``log`` block all rows
(or unique prompts) and skip what their own shard or the merged output already holds, so a
restarted process resumes its shard. Without ``WORLD_SIZE`` every helper here is the trivial
single-process version and nothing distributed is imported.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from tracekit.errors import ConfigError

if TYPE_CHECKING:
    from tracekit.config.base import TracekitConfig
    from tracekit.models.loading import ModelConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, items: Sequence[T], multiple: int = 1) -> list[T]:
        """This process's contiguous block of ``items``, block edges on multiples of
        ``multiple`` (block sizes differ by at most one ``multiple``).

        Generation, extraction and logging shard this way with ``multiple`` = the batch size:
        each process's batches are exactly batches a single process runs, so even bf16 outputs
        (whose numerics depend on which rows share a batch and its padding) come out the same.
        """
        span = self.block_range(len(items), multiple)
        return list(items[span.start : span.stop])

    def block_range(self, n: int, multiple: int = 1) -> range:
        """The indices of this process's block of ``n`` items (see :meth:`block`)."""
        step = max(1, int(multiple))
        chunks = -(-n // step)
        start = chunks * self.rank // self.world_size * step
        end = chunks * (self.rank + 1) // self.world_size * step
        return range(min(start, n), min(end, n))

    def part_tag(self) -> str:
        """Suffix naming this process's journal parts (empty for a single process)."""
        return f"-rank{self.rank}" if self.distributed else ""


GPU_PER_PROCESS_ENV = "TRACEKIT_GPU_PER_PROCESS"
"""Set to ``1`` by :func:`launch`: each process then sees only its own GPU (see
:func:`isolate_gpu`)."""


def isolate_gpu() -> None:
    """In a process started by :func:`launch`, show CUDA only this process's GPU.

    ``CUDA_VISIBLE_DEVICES`` becomes the ``LOCAL_RANK``-th entry of the launcher's list (or the
    ``LOCAL_RANK``-th GPU), so every process runs on its ``cuda:0``. Two things follow: no
    process creates a context on another's GPU, and compiled code (torch.compile's on-disk
    cache keys on the device index) and kernel decisions are shared by all processes instead
    of each GPU index compiling its own. Must run before CUDA is initialized: ``python -m
    tracekit`` calls it first thing. Does nothing outside such a process or with the variable
    set to anything but ``1``.
    """
    if os.environ.get(GPU_PER_PROCESS_ENV) != "1" or "LOCAL_RANK" not in os.environ:
        return
    try:
        local = int(os.environ["LOCAL_RANK"])
    except ValueError:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local)
        return
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    if local < len(ids):  # fewer GPUs than processes: leave it (processes share GPUs)
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local]


COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"
"""torch.compile's worker-pool size (inductor reads it once, when it is first imported)."""


def share_host_cpus() -> None:
    """In one of several processes on one host, size torch.compile's worker pool to this
    process's share of the CPUs.

    Each process otherwise starts a pool of up to 32 compile workers (each importing torch)
    sized for the whole machine, all at the same moment: N processes then compete for the
    cores while they set up their decode steps. Uses ``LOCAL_WORLD_SIZE`` (torchrun,
    accelerate and :func:`launch` set it); a value the user set is kept. Must run before
    torch's inductor is imported: ``python -m tracekit`` calls it first thing.
    """
    if COMPILE_THREADS_ENV in os.environ:
        return
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return
    if local_world <= 1:
        return
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    os.environ[COMPILE_THREADS_ENV] = str(max(1, min(32, cpus // local_world)))


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def main_process_by_env() -> bool:
    """Whether this is the main process (rank 0, or not distributed), read from the launcher's
    environment alone: unlike :func:`process_info` it joins no process group, so code that runs
    before or outside a run's setup (a notice while reading an input file) can ask."""
    if _env_world_size() <= 1:
        return True
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def process_info() -> ProcessInfo:
    """Discover rank and world size; joins the process group on first use when distributed.

    The group is set up through accelerate's ``PartialState`` (the launcher's environment
    variables; gloo on CPU, nccl on CUDA, and on CUDA this process's GPU becomes the current
    device).
    """
    if _env_world_size() <= 1:
        return ProcessInfo()
    import torch
    from accelerate import PartialState

    # accelerate only sets up gloo (multi-CPU) when told the run is on CPU
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != _env_world_size():
        raise ConfigError(
            f"WORLD_SIZE is {_env_world_size()} but accelerate set up {state.num_processes} "
            "process(es)",
            "start tracekit with accelerate launch, torchrun or --num-processes",
        )
    _leave_group_at_exit()
    return ProcessInfo(
        rank=state.process_index,
        world_size=state.num_processes,
        local_rank=state.local_process_index,
    )


_LEAVING_REGISTERED = False


def _leave_group_at_exit() -> None:
    """Destroy a gloo process group when this process exits (once).

    A process that exits with its gloo group alive can abort in the group's destructor during
    interpreter shutdown ("terminate called without an active exception", SIGABRT: gloo's
    worker threads still hold work objects when the interpreter is torn down); the launcher
    then counts the run as failed and stops the other processes, although every collective had
    finished. Seen on CPU in a 2-process resume test, about one suite run in five. NCCL groups
    (GPUs) are left as they were measured: their teardown has never failed here.
    """
    global _LEAVING_REGISTERED
    if _LEAVING_REGISTERED:
        return
    _LEAVING_REGISTERED = True
    import atexit

    def leave() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()

    atexit.register(leave)


def exit_process(status: object = None) -> NoReturn:
    """End ``python -m tracekit`` with ``status`` (what ``SystemExit`` carries).

    A process that is in a gloo group (data-parallel on CPU) leaves the group, flushes its
    output and ends with ``os._exit``, skipping the interpreter's finalization. Destroying the
    group at exit (:func:`_leave_group_at_exit`) made the abort rarer but did not end it:
    gloo's worker threads could still abort the process while the interpreter was torn down
    ("terminate called without an active exception", SIGABRT, in about one CPU suite run in
    ten), after every collective and every output had finished, and the launcher then failed
    the run. Any other process exits normally."""
    code = 0 if status is None else status if isinstance(status, int) else 1
    if not isinstance(status, int | None):
        sys.stderr.write(f"{status}\n")
    dist = sys.modules.get("torch.distributed")  # imported by the run if it used a group
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    if dist.get_backend() != "gloo":
        sys.exit(code)
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def process_device(info: ProcessInfo, device: str) -> str:
    """This process's device: ``auto``/``cuda`` become ``cuda:<local rank>`` when distributed."""
    if not info.distributed or device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        # one visible GPU per process (isolate_gpu) -> cuda:0; else the local rank's GPU
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return device


def process_model_config(settings: ModelConfig, info: ProcessInfo) -> ModelConfig:
    """``settings`` for this process: its own GPU when data-parallel (see
    :func:`process_device`). ``--device-map`` is refused there: each process would spread its
    copy of the model over every GPU."""
    if not info.distributed:
        return settings
    if settings.device_map is not None:
        raise ConfigError(
            "--device-map auto cannot be combined with several processes (each process would "
            "spread the model over every GPU)",
            "run one process with --device-map auto, or several without it",
        )
    return settings.model_copy(update={"device": process_device(info, settings.device)})


def barrier(info: ProcessInfo) -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather(info: ProcessInfo, value: T) -> list[T]:
    """Every process's ``value`` (picklable, small), in rank order; ``[value]`` when single."""
    if not info.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _write_config_file(config: TracekitConfig) -> Path:
    """The resolved config as a temporary JSON file (the launcher deletes it afterwards)."""
    fd, name = tempfile.mkstemp(suffix=".json", prefix="tracekit-launch-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(config.model_dump(mode="json"), handle)
    return Path(name)


def launch(
    verb: Sequence[str],
    config: TracekitConfig,
    num_processes: int,
    extra_args: Sequence[str] = (),
) -> int:
    """Run ``tracekit VERB`` in ``num_processes`` processes with ``config``; return the exit code.

    The resolved config travels as a JSON ``--config`` file, so every process sees exactly the
    options this one resolved. Outputs and errors of the processes go to this process's stdout
    and stderr; the launcher stops every process when one fails.
    """
    if num_processes < 2:
        raise ConfigError("--num-processes must be at least 2 to launch", "omit it to run here")
    if _env_world_size() > 1:
        raise ConfigError(
            "--num-processes inside an already distributed run",
            "drop --num-processes when starting tracekit with accelerate launch or torchrun",
        )
    config_file = _write_config_file(config)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={num_processes}",
        "-m",
        "tracekit",
        *verb,
        "--config",
        str(config_file),
        *extra_args,
    ]
    logger.info("launching: %s", " ".join(command))
    env = dict(os.environ)
    # --standalone picks a free rendezvous port on loopback; split the CPU threads between ranks
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    env.setdefault(GPU_PER_PROCESS_ENV, "1")  # each process sees only its own GPU
    try:
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        config_file.unlink(missing_ok=True)
