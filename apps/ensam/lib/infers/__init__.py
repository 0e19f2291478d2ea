"""MONAI Label infer glue for ensam (the model work happens in lib.engine; volumes and masks: lib.io; requests:
lib.request_parsing; batch manifests: lib.batch.sources)."""

from .batch import EnsamBatchInfer
from .engine_provider import EngineProvider, resolve_device
from .ensam_infer import EnsamInteractive

__all__ = ["EnsamBatchInfer", "EngineProvider", "resolve_device", "EnsamInteractive"]
