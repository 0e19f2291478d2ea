"""Shared I/O that needs no MONAI Label: volumes (``lib.io.volumes``)."""

from .volumes import Volume, file_key, is_nifti, load_volume

__all__ = ["Volume", "load_volume", "is_nifti", "file_key"]
