"""Shared I/O that needs no MONAI Label: volumes (``volumes``: THE loader; ``imageio``: upload checks, the volume
cache, the mask writer), atomic file writes (``atomic``), safe unpacking of
uploaded archives (``archive``)."""

from .volumes import Volume, file_key, is_nifti, load_volume

__all__ = ["Volume", "load_volume", "is_nifti", "file_key"]
