"""Batch inference: one job code for the command line (``python -m lib.batch``) and the REST batch route
(``lib.infers.batch``), run in this process (backend ``local``) or on a Ray cluster (backend ``ray``, Ray Data with
one :class:`~lib.batch.worker.Segmenter` per worker). Idempotent and resumable: one result per (study, weights
version, request), written atomically; see :mod:`lib.batch.job`. docs/SCALE_OUT.md, "Batch inference on Ray".

Plain Python + the engine: MONAI Label is imported only for a datastore or DICOMweb input and the DICOM SEG output.
"""

from lib.batch.job import BACKENDS, BatchJob, Study, result_key, run_job, weights_sha256
from lib.batch.store import ResultStore

__all__ = ["BACKENDS", "BatchJob", "ResultStore", "Study", "result_key", "run_job", "weights_sha256"]
