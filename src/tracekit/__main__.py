"""``python -m tracekit`` runs the CLI."""

from tracekit.distributed import exit_process, isolate_gpu, share_host_cpus

isolate_gpu()  # before anything initializes CUDA
share_host_cpus()  # before torch.compile's inductor is imported

from tracekit.cli import main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:  # the CLI ends this way; a data-parallel process ends harder
        exit_process(exc.code)
    exit_process()
