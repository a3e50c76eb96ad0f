"""``python -m tracekit`` runs the CLI."""

from tracekit.distributed import isolate_gpu

isolate_gpu()  # before anything initializes CUDA

from tracekit.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
