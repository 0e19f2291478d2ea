"""monailabel's local datastore with crash-safe writes (issue 10: SIGKILL during label saves). Part of
:mod:`lib.monailabel_patches` (its patch 5): it overrides and reads monailabel's private names.

monailabel 0.8.5's :class:`LocalDatastore` copies a saved label (and an added image) over its destination in place
(``shutil.copy``) and rewrites its index ``datastore_v2.json`` in place (``open(.., "w")``): a process killed in
the middle leaves a truncated label, or a truncated index (which the next start cannot parse: it then rebuilds the
index from the files and every label's info, e.g. its names, is lost).

:class:`AtomicLocalDatastore` writes each of them to a temporary file in the same folder, fsyncs it, and publishes it
with one ``os.replace``: after a kill at any moment a label is the old one or the new one, whole, and the index
parses. The label file is published before the index names it; a kill between the two leaves the new label with
the old entry (still consistent: the next start's reconciliation keeps both). Temporary files of dead writers
(``.<name>.<pid>.<random>.ensam-tmp``, invisible to the datastore's file patterns) are removed at start-up.

State that outlives a bad request (issue 25):

* the index is read entry by entry when pydantic refuses it as a whole (e.g. image info nested deeper than its 200
  levels, as monailabel stored it): an entry it cannot read is skipped and logged (a copy of the file is kept as
  ``datastore_v2.json.<time>.bad-entries``), the others keep their info, the image comes back from its file; an
  index that is not JSON at all is set aside (``.unreadable``) and rebuilt from the files, where monailabel
  refused to start;
* one id, one image: an upload replaces every file of the id (another extension included) and sets the old
  image's label files aside; ``remove_image`` removes every file of the id and its label files of every tag; a
  label is saved only while its image is there (checked under the file lock, like the delete); label files
  without their image are set aside at start-up (``.orphan-labels/<tag>/``, logged), so that a label never
  attaches itself to another image uploaded later under the same id.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from typing import Any, Dict

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException

from lib.io.atomic import atomic_write_bytes_from, atomic_write_text, remove_dead_temps
from lib.io.json_bounds import json_problem

ORPHAN_DIR = ".orphan-labels"  # label files set aside (no image, or their image replaced), per tag
INDEX_ENTRY_DEPTH = 64  # an index entry nested deeper is skipped (the whole index must stay within pydantic's 200)

logger = logging.getLogger(__name__)

# atomic writes: lib/io/atomic.py (one implementation for the datastore, the weights and the JSON files)
atomic_copy = atomic_write_bytes_from


class AtomicLocalDatastore(LocalDatastore):
    """:class:`LocalDatastore` whose label / image / index writes are atomic (see the module doc)."""

    def __init__(self, datastore_path: str, *args, **kwargs):
        removed = remove_dead_temps(datastore_path) if os.path.isdir(datastore_path) else 0
        if removed:
            logger.info(f"datastore: removed {removed} temporary file(s) of writers that died")
        super().__init__(datastore_path, *args, **kwargs)
        if not kwargs.get("read_only", False):
            self._set_aside_orphan_labels()

    # ---- the index -----------------------------------------------------------------------------------------
    def _init_from_datastore_file(self, throw_exception=False):
        """As monailabel's, but an index entry that cannot be read is skipped (logged) instead of failing the whole
        index, and at start-up (``throw_exception``) an index that is not JSON at all is set aside and rebuilt
        from the files instead of stopping the server."""
        try:
            with FileLock(self._lock_file):
                if os.path.exists(self._datastore_config_path):
                    ts = os.stat(self._datastore_config_path).st_mtime
                    if self._config_ts != ts:
                        with open(self._datastore_config_path) as fp:
                            text = fp.read()
                        try:
                            self._datastore = self._read_index(text)
                        except (ValueError, RecursionError) as e:
                            if not throw_exception:
                                raise ValueError(str(e)[:500]) from None
                            aside = f"{self._datastore_config_path}.{int(time.time())}.unreadable"
                            os.replace(self._datastore_config_path, aside)
                            logger.error(f"datastore index {self._datastore_config_path} cannot be read "
                                         f"({type(e).__name__}: {str(e)[:300]}); set aside as {aside}, the index "
                                         f"is rebuilt from the files (image and label info lost)")
                            return
                        self._datastore.base_path = self._datastore_path
                        self._config_ts = ts
        except ValueError as e:
            logger.error(f"+++ Failed to load datastore => {e}")
            if throw_exception:
                raise e

    def _read_index(self, text: str) -> LocalDatastoreModel:
        """The index model of ``text``; when pydantic refuses it as a whole, entry by entry: an entry that cannot
        be read (or is nested deeper than :data:`INDEX_ENTRY_DEPTH`) is skipped and logged."""
        try:
            return LocalDatastoreModel.model_validate_json(text)
        except ValueError:
            pass
        raw = json.loads(text)  # ValueError / RecursionError: not JSON at all (the caller decides)
        if not isinstance(raw, dict) or not isinstance(raw.get("objects", {}), dict):
            raise ValueError("the index is not a JSON object with 'objects'")
        objects = raw.pop("objects", {})
        model = LocalDatastoreModel.model_validate(dict(raw, objects={}))
        skipped = []
        for image_id, entry in objects.items():
            problem = json_problem(entry, f"entry {image_id!r}", INDEX_ENTRY_DEPTH)
            if problem is None:
                try:
                    model.objects[image_id] = ImageLabelModel.model_validate(entry)
                    continue
                except ValueError as e:
                    problem = str(e)[:300]
            skipped.append(image_id)
            logger.error(f"datastore index {self._datastore_config_path}: entry {str(image_id)[:80]!r} skipped, it "
                         f"cannot be read: {problem[:300]}; its image and labels are listed again from their files "
                         f"(without that entry's info)")
        if skipped:
            copy = f"{self._datastore_config_path}.{int(time.time())}.bad-entries"
            try:
                with open(copy, "w") as out:
                    out.write(text)
            except OSError:
                copy = "(no copy: cannot write it)"
            logger.error(f"datastore index: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} skipped; the "
                         f"index as it was is kept as {copy}")
        return model

    # ---- the files of one id -------------------------------------------------------------------------------
    def _exts(self):
        return [e.replace("*", "") for e in self._extensions]

    def _id_files(self, folder: str, image_id: str, known: set) -> list:
        """The files of ``image_id`` in ``folder``: under the extensions ``known`` (its entry's) and any other the
        datastore keeps whose name maps back to that id."""
        out = []
        for ext in dict.fromkeys([*known, *self._exts()]):
            name = self._filename(image_id, ext)
            p = os.path.join(folder, name)
            if os.path.lexists(p) and not os.path.isdir(p) and (ext in known or self._to_id(name)[0] == image_id):
                out.append(p)
        return out

    def _tag_folders(self) -> list:
        """The label folders on disk, one per tag (hidden ones, such as the set-aside labels, excluded)."""
        root = self._datastore.label_path(None)
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        return [os.path.join(root, t) for t in names if not t.startswith(".") and os.path.isdir(os.path.join(root, t))]

    def _image_files(self, image_id: str) -> list:
        """Every image file of ``image_id`` on disk (any extension the datastore keeps, and the one its entry
        names)."""
        obj = self._datastore.objects.get(image_id)
        return self._id_files(self._datastore.image_path(), image_id, {obj.image.ext} if obj else set())

    def _label_files(self, image_id: str) -> list:
        """Every label file of ``image_id`` on disk, under every tag folder."""
        obj = self._datastore.objects.get(image_id)
        known = {lab.ext for lab in obj.labels.values()} if obj else set()
        return [p for folder in self._tag_folders() for p in self._id_files(folder, image_id, known)]

    def _set_aside(self, path: str, why: str) -> str:
        """Move a label file to ``<studies>/.orphan-labels/<tag>/<name>.<time>`` (out of every folder the
        datastore lists)."""
        tag = os.path.basename(os.path.dirname(path))
        folder = os.path.join(self._datastore_path, ORPHAN_DIR, tag)
        os.makedirs(folder, exist_ok=True)
        dest = os.path.join(folder, f"{os.path.basename(path)}.{time.time_ns()}")
        os.replace(path, dest)
        logger.warning(f"datastore: label {tag}/{os.path.basename(path)} set aside ({why}) -> {dest}")
        return dest

    def _set_aside_orphan_labels(self) -> int:
        """At start-up: label files whose image is not on disk are set aside (a label never outlives its image:
        one left by a delete race attached itself to the next image uploaded under that id)."""
        n = 0
        with FileLock(self._lock_file):
            for folder in self._tag_folders():
                for name in sorted(os.listdir(folder)):
                    p = os.path.join(folder, name)
                    if name.startswith(".") or os.path.isdir(p) or \
                            not any(fnmatch.fnmatch(name, e) for e in self._extensions):
                        continue
                    image_id = self._to_id(name)[0]
                    if not self._image_files(image_id):
                        self._set_aside(p, f"no image {image_id!r}")
                        n += 1
        if n:
            logger.warning(f"datastore: {n} label file(s) without their image set aside in "
                           f"{os.path.join(self._datastore_path, ORPHAN_DIR)}")
        return n

    # ---- links in the studies folder (issue 25) -----------------------------------------------------------
    # monailabel lists every name matching its patterns and serves it through os.path.realpath: a link
    # ``shadow.nii.gz -> /etc/shadow`` in the studies folder was served by GET /datastore/image, and a linked label
    # went into the dataset zip. Only regular files inside the studies folder are listed, indexed and served; a
    # link (to anywhere, inside too), anything else that is not a regular file, and a file reached through a linked
    # folder are skipped and logged (once per path). Writes replace a link by a regular file (``add_image`` and
    # ``save_label`` publish onto the name, never onto the link's target).
    def _link_problem(self, path: str) -> str:
        """Why the datastore entry ``path`` is refused, or "" (a regular file inside the studies folder, or no file
        at all: monailabel's own checks then apply)."""
        if os.path.islink(path):
            try:
                return f"a symbolic link (to {os.readlink(path)!r})"
            except OSError:
                return "a symbolic link"
        if not os.path.lexists(path):
            return ""
        if not os.path.isfile(path):
            return "not a regular file"
        root = os.path.realpath(self._datastore_path)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            return "outside the studies folder (reached through a linked folder)"
        return ""

    def _refused(self, path: str) -> bool:
        problem = self._link_problem(path)
        if problem:
            logged = self.__dict__.setdefault("_refused_logged", set())
            if (path, problem) not in logged:
                logged.add((path, problem))
                logger.warning(f"datastore: {path} is refused: {problem}; only regular files inside the studies "
                               f"folder are listed and served")
        return bool(problem)

    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        return {k: v for k, v in files.items() if not self._refused(os.path.join(path, v))}

    def _drop_refused(self) -> int:
        """Index entries (images, labels) whose file is refused are dropped from the index in memory."""
        n = 0
        for image_id in list(self._datastore.objects):
            obj = self._datastore.objects[image_id]
            if self._refused(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))):
                del self._datastore.objects[image_id]
                n += 1
                continue
            for tag in list(obj.labels):
                name = self._filename(image_id, obj.labels[tag].ext)
                if self._refused(os.path.join(self._datastore.label_path(tag), name)):
                    del obj.labels[tag]
                    n += 1
        return n

    def _remove_non_existing(self) -> int:
        return super()._remove_non_existing() + self._drop_refused()

    def get_image_uri(self, image_id: str) -> str:
        obj = self._datastore.objects.get(image_id)
        if obj and self._refused(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))):
            return ""
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        label = self._datastore.label(label_id, label_tag)
        if label and self._refused(os.path.join(self._datastore.label_path(label_tag),
                                                self._filename(label_id, label.ext))):
            return ""
        return super().get_label_uri(label_id, label_tag)

    def datalist(self, full_path=True):
        self._drop_refused()  # a file replaced by a link after it was indexed: never into training or the zip
        return super().datalist(full_path)

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
        # onto the name, not its realpath: a link of that name is replaced, never the file it points to (issue 25)
        dest = os.path.join(os.path.realpath(self._datastore.image_path()), name)
        with FileLock(self._lock_file):
            others = [p for p in self._image_files(image_id) if os.path.basename(p) != name]
            old_labels = self._label_files(image_id)
            atomic_copy(image_filename, dest)
            for p in others:  # one id, one image: the same id with another extension is replaced
                os.remove(p)
                logger.info(f"datastore: image {image_id!r} replaced: {os.path.basename(p)} removed")
            for p in old_labels:  # labels of the image replaced (or orphans) never attach to the new one
                self._set_aside(p, f"image {image_id!r} replaced by an upload")
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
            obj = self._datastore.objects.get(image_id)
            if not obj or not self._image_files(image_id):  # deleted meanwhile: no label without its image
                raise ImageNotFoundException(f"Image {image_id} not found")
            os.makedirs(label_path, exist_ok=True)
            atomic_copy(label_filename, dest)
            label_info = dict(label_info) if label_info else {}
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        logger.info(f"label of {image_id!r} (tag {label_tag!r}) saved atomically: {name}")
        return image_id

    def remove_image(self, image_id: str) -> None:
        """The image, every other file of its id and its label files (every tag) removed, and its entry, in one
        step under the datastore's file lock (monailabel removed them one by one, outside the lock: a label saved
        meanwhile stayed behind, and a file of the id with another extension was listed again)."""
        with FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            images, labels = self._image_files(image_id), self._label_files(image_id)
            if not obj and not images:
                raise ImageNotFoundException(f"Image {image_id} not found")
            for p in labels + images:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
            self._datastore.objects.pop(image_id, None)
            self._update_datastore_file(lock=False)
        logger.info(f"image {image_id!r} removed: {len(images)} image file(s), {len(labels)} label file(s)")
        if not self._auto_reload:
            self.refresh()
