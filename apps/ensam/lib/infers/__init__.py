"""MONAI Label infer glue for ensam (the model work happens in lib.engine; volumes and masks: lib.io)."""

from .batch import EnsamBatchInfer, load_manifest
from .engine_provider import EngineProvider, resolve_device
from .ensam_infer import EnsamInteractive
from .request_parsing import RequestError, parse_prompts, validate_prompts

__all__ = [
    "EnsamBatchInfer", "load_manifest", "EngineProvider", "resolve_device", "EnsamInteractive", "RequestError",
    "parse_prompts", "validate_prompts",
]
