"""tracekit: interpretability data from Hugging Face causal language models.

Every CLI verb is also a Python call; names are imported lazily so ``import tracekit`` stays
fast and does not pull in torch.
"""

from __future__ import annotations

from tracekit._lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "log_activations": "tracekit.jobs.log",
    "LogConfig": "tracekit.config.log",
    "ActivationLogger": "tracekit.actlog.logger",
    "reconstruct": "tracekit.jobs.reconstruct",
    "ReconstructConfig": "tracekit.config.reconstruct",
    "open_store": "tracekit.storage.activation_store",
    "LayerSpec": "tracekit.config.types",
    "Normalization": "tracekit.config.choices",
    "parse_layers_arg": "tracekit.config.types",
    "TracekitError": "tracekit.errors",
    "ModelConfig": "tracekit.models.loading",
    "load_model": "tracekit.models.loading",
    "LayerTaps": "tracekit.models.capture",
    "save_generations_to_cache": "tracekit.storage.generation_cache",
    "load_generations_from_cache": "tracekit.storage.generation_cache",
    "decode": "tracekit.jobs.decode",
    "DecodeConfig": "tracekit.config.decode",
    "build_dataset": "tracekit.datasets.build",
    "BuildDatasetConfig": "tracekit.config.build_dataset",
    "save_dataset": "tracekit.datasets.build",
    "normalize_features": "tracekit.datasets.normalization",
    "extract_features": "tracekit.jobs.extract_features",
    "FeaturesConfig": "tracekit.config.features",
    "load_sae": "tracekit.sae.formats",
    "load_saes": "tracekit.sae.layout",
    "SparseAutoencoder": "tracekit.sae.model",
    "load_all_sentences": "tracekit.storage.sentences",
    "get_final_token_data": "tracekit.storage.sentences",
    "TraitDefinition": "tracekit.traits",
    "load_trait": "tracekit.traits",
    "GenerationParams": "tracekit.engines.interface",
    "CaptureSpec": "tracekit.engines.interface",
    "create_engine": "tracekit.engines.interface",
    "CudaEngine": "tracekit.engines.cuda.engine",
    "Pooling": "tracekit.engines.pooling",
    "generate": "tracekit.jobs.generate",
    "GenerateConfig": "tracekit.config.generate",
    "extract_activations": "tracekit.jobs.extract_activations",
    "ExtractActivationsConfig": "tracekit.config.extract_activations",
    "Steering": "tracekit.engines.steering",
    "steering_report": "tracekit.report.steering",
    "SteeringReportConfig": "tracekit.config.report",
    "extract_vectors": "tracekit.vectors.mean_diff",
    "ExtractVectorsConfig": "tracekit.config.extract_vectors",
    "extract_projections": "tracekit.vectors.projections",
    "ProjectionsConfig": "tracekit.config.extract_projections",
    "judge_rows": "tracekit.jobs.judge",
    "judge_file": "tracekit.jobs.judge",
    "JudgeConfig": "tracekit.config.judge",
    "JudgeJobConfig": "tracekit.config.judge",
}


__getattr__, __dir__ = lazy_attributes("tracekit", _LAZY, globals())

__all__ = ["__version__", *sorted(_LAZY)]
