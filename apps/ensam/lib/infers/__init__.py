"""MONAI Label infer glue for ensam (the model work happens in lib.engine)."""

from .batch import EnsamBatchInfer, load_manifest
from .engine_provider import EngineProvider, resolve_device
from .ensam_infer import EnsamInteractive, EnsamSegmentation
from ..io.imageio import Volume, VolumeCache, load_volume, write_mask
from .request_parsing import RequestError, parse_prompts, validate_prompts
from .session_store import SessionStore

__all__ = [
    "EnsamBatchInfer", "load_manifest", "EngineProvider", "resolve_device", "EnsamInteractive", "EnsamSegmentation",
    "Volume", "VolumeCache", "load_volume", "write_mask", "RequestError", "parse_prompts", "validate_prompts",
    "SessionStore",
]
