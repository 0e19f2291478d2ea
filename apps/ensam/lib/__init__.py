"""ensam: a small promptable 3D segmentation model and its MONAI Label app (see docs/ARCHITECTURE.md).

Kept import-free on purpose: monailabel's loader unloads and re-imports ``lib.*``, and the uvicorn app module
``lib.server`` must import without pulling in torch models.
"""
