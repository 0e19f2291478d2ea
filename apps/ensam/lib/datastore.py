"""monailabel's local datastore with crash-safe writes (issue 10: SIGKILL during label saves).

monailabel 0.8.5's :class:`LocalDatastore` copies a saved label (and an added image) over its destination in place
(``shutil.copy``) and rewrites its index ``datastore_v2.json`` in place (``open(.., "w")``): a process killed in
the middle leaves a truncated label, or a truncated index (which the next start cannot parse: it then rebuilds the
index from the files and every label's info, e.g. its names, is lost).

:class:`AtomicLocalDatastore` writes each of them to a temporary file in the same folder, fsyncs it, and publishes it
with one ``os.replace``: after a kill at any moment a label is the old one or the new one, whole, and the index
parses. The label file is published before the index names it; a kill between the two leaves the new label with
the old entry (still consistent: the next start's reconciliation keeps both). Temporary files of dead writers
(``.<name>.<pid>.<random>.ensam-tmp``, invisible to the datastore's file patterns) are removed at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from lib.io.atomic import TMP_SUFFIX, atomic_write_bytes_from, atomic_write_text, pid_alive  # noqa: F401

logger = logging.getLogger(__name__)

# atomic writes: lib/io/atomic.py (one implementation for the datastore, the weights and the JSON files)
atomic_copy = atomic_write_bytes_from


def remove_dead_temps(root: str) -> int:
    """Remove ``*.ensam-tmp`` files under ``root`` whose writer process is gone; returns how many."""
    n = 0
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(TMP_SUFFIX):
                continue
            parts = f.split(".")
            pid = next((p for p in reversed(parts[:-1]) if p.isdigit()), None)
            if pid is not None and pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            try:
                os.remove(os.path.join(d, f))
                n += 1
            except OSError:
                pass
    return n


class AtomicLocalDatastore(LocalDatastore):
    """:class:`LocalDatastore` whose label / image / index writes are atomic (see the module doc)."""

    def __init__(self, datastore_path: str, *args, **kwargs):
        removed = remove_dead_temps(datastore_path) if os.path.isdir(datastore_path) else 0
        if removed:
            logger.info(f"datastore: removed {removed} temporary file(s) of writers that died")
        super().__init__(datastore_path, *args, **kwargs)

    def _update_datastore_file(self, lock=True):
        def write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_text(text, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """As monailabel's, with the image copied atomically."""
        id, image_ext = self._to_id(os.path.basename(image_filename))
        if not image_id:
            image_id = id
        name = self._filename(image_id, image_ext)
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        with FileLock(self._lock_file):
            atomic_copy(image_filename, dest)
            image_info = image_info if image_info else {}
            image_info["ts"] = int(time.time())
            image_info["name"] = name
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=image_info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """As monailabel's, with the label copied atomically (then the index, atomically too)."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            atomic_copy(label_filename, dest)
            label_info = dict(label_info) if label_info else {}
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        logger.info(f"label of {image_id!r} (tag {label_tag!r}) saved atomically: {name}")
        return image_id

