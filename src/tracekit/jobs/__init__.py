"""One module per command: the only place that combines engines, the judge, storage and
distributed runs. Import from the submodules; this package does not import torch."""
