"""Fine-tuning through the MONAI Label train task, measured: box-only DSC of one structure on OTHER volumes,
before and after fine-tuning on one volume's label of that structure.

It builds a throw-away local datastore holding the training volume with its label reduced to the structure
(saved with Slicer-style ``label_info``), runs the ``ensam`` train task exactly as ``POST /train/ensam`` does
(same class, same request keys), and scores the pre-trained and the published weights with the engine on the
evaluation volumes, one box per volume from the reference label (its bounding box, ``--jitter`` voxels outward
at random, seeded).

    python -m lib.experiments.demo_finetune --structure liver --minutes 10 \
        --train sample-datasets/train/imagesTr/ct_small.nii.gz sample-datasets/train/labelsTr/ct_small.nii.gz \
        --eval sample-datasets/eval --out eval-results/finetune_liver.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np


def box_dsc(weights: Optional[str], cases: List[dict], jitter: int, seed: int, device: str = "cpu") -> Dict:
    from lib.engine import EnsamEngine
    from lib.prompts.simulation import box_from_mask

    from lib.evaluation.metrics import dice

    eng = EnsamEngine(weights=weights, device=device)
    out = {}
    for c in cases:
        ref = c["label"] == c["value"]
        box = box_from_mask(ref, jitter=jitter, rng=seed)
        t = time.time()
        m = eng.segment(c["image"], c["affine"], boxes=[box.tolist()]) > 0
        out[c["name"]] = {"dsc": round(dice(m, ref), 4), "seconds": round(time.time() - t, 2)}
    return out


def _eval_cases(folder: str, structure: str) -> List[dict]:
    from lib.io.imageio import load_volume
    from lib.label_vocab import builtin_vocab, canonical

    vocab = builtin_vocab()
    with open(os.path.join(folder, "dataset.json")) as f:
        ds = json.load(f)
    cases = []
    for e in ds.get("testing") or ds.get("training") or []:
        values = [int(v) for v, n in (e.get("labels") or {}).items() if canonical(n, vocab) == structure]
        if not values:
            continue
        img = load_volume(os.path.join(folder, e["image"]))
        lab = load_volume(os.path.join(folder, e["label"]))
        cases.append({"name": os.path.basename(e["image"]).split(".")[0], "image": img.array, "affine": img.affine,
                      "label": np.asarray(lab.array), "value": values[0]})
    return cases


def run(structure: str, train_image: str, train_label: str, train_value: int, eval_folder: str, minutes: float,
        weights: str, jitter: int = 3, seed: int = 0, device: str = "cpu", rehearsal: float = 0.3,
        log=print) -> Dict:
    import nibabel as nib
    from monailabel.datastore.local import LocalDatastore

    from lib.io.imageio import load_volume
    from lib.trainers.ensam_train import EnsamTrain

    weights = os.path.abspath(weights)
    cases = _eval_cases(eval_folder, structure)
    if not cases:
        raise SystemExit(f"no evaluation volume holds {structure!r}")
    work = tempfile.mkdtemp(prefix="ensam_demo_")
    try:
        studies, model_dir = os.path.join(work, "studies"), os.path.join(work, "model")
        os.makedirs(studies)
        os.makedirs(model_dir)
        for f in os.listdir(os.path.dirname(weights)):  # the pre-trained weights and their companions
            if f.startswith(os.path.splitext(os.path.basename(weights))[0]):
                os.symlink(os.path.join(os.path.dirname(weights), f), os.path.join(model_dir, f))
        name = os.path.basename(train_image).split(".")[0]
        shutil.copy(train_image, os.path.join(studies, os.path.basename(train_image)))
        lab = load_volume(train_label)
        one = (np.asarray(lab.array) == train_value).astype(np.uint8)
        tmp_label = os.path.join(work, "label.nii.gz")
        nib.save(nib.Nifti1Image(one, lab.affine), tmp_label)
        ds = LocalDatastore(studies, extensions=["*.nii.gz", "*.nii"], auto_reload=False)
        ds.save_label(name, tmp_label, "final", {"label_info": [{"name": structure, "idx": 1}]})

        pre = os.path.join(model_dir, os.path.basename(weights))
        before = box_dsc(pre, cases, jitter, seed, device)
        log(f"before: {before}")
        task = EnsamTrain(model_dir, [pre, os.path.join(model_dir, "ensam.pt")])
        t = time.time()
        stats = task({"max_seconds": minutes * 60, "labels": structure, "device": device, "seed": seed,
                      "rehearsal": rehearsal}, ds)
        train_s = time.time() - t
        after = box_dsc(os.path.join(model_dir, "ensam.pt"), cases, jitter, seed, device)
        log(f"after:  {after}  (training {train_s:.0f}s, {stats.get('steps')} steps)")
        return {"structure": structure, "train_image": name, "minutes": minutes, "rehearsal": rehearsal,
                "train_seconds": round(train_s, 1),
                "steps": stats.get("steps"), "val_before": stats.get("val_before"), "val_best": stats.get("val_best"),
                "box_dsc_before": before, "box_dsc_after": after,
                "gain": {k: round(after[k]["dsc"] - before[k]["dsc"], 4) for k in before}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--structure", required=True)
    p.add_argument("--train", nargs=2, required=True, metavar=("IMAGE", "LABEL"))
    p.add_argument("--train-value", type=int, default=0, help="label value of the structure (default: from the "
                   "built-in vocabulary, TotalSegmentator ids = token id + 1)")
    p.add_argument("--eval", required=True, help="folder with dataset.json")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--weights", default=os.path.join(here, "model", "pretrained_ensam.pt"))
    p.add_argument("--jitter", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rehearsal", type=float, default=0.3, help="see lib.training.finetune (0 = none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    from lib.label_vocab import builtin_vocab

    value = a.train_value or builtin_vocab()[a.structure] + 1
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    res = run(a.structure, a.train[0], a.train[1], value, a.eval, a.minutes, a.weights, a.jitter, a.seed, a.device,
              a.rehearsal)
    print(json.dumps(res, indent=1))
    if a.out:
        from lib.label_vocab import atomic_write_json

        atomic_write_json(res, a.out)


if __name__ == "__main__":
    main()
