"""Does the ``uncertainty`` score predict the real error? Spearman correlation on labelled data.

For every (image, structure) of a dataset (``dataset.json`` with ``testing``/``training`` entries holding
``image``, ``label`` and ``labels`` {value: name}) whose name ensam knows, it computes exactly what the
``uncertainty`` scoring method computes (disagreement of the prompt-free predictions under test-time flips) and
the real error ``1 - DSC`` of the prompt-free prediction ``ensam_seg`` gives (3 mm working spacing) against the
reference, then the
Spearman rank correlation between the two, over (image, structure) pairs and over images (scores averaged per
image, as the scoring method stores them).

    python -m lib.experiments.uncertainty_vs_error --data sample-datasets/eval --out eval-results/uncertainty.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np

from lib.label_vocab import canonical, load_vocab

from ..evaluation.metrics import dice
from ..activelearning.features import disagreement, flip_predictions


def evaluate(data: str, weights: List[str], device: str = "cpu", max_labels: int = 0,
             min_voxels: int = 50, spacing_mm: float = 5.0, error_spacing_mm: float = 3.0, log=print) -> Dict:
    from scipy.stats import spearmanr

    from lib.engine import EnsamEngine
    from lib.io.imageio import load_volume

    with open(os.path.join(data, "dataset.json")) as f:
        ds = json.load(f)
    entries = ds.get("testing") or ds.get("training") or []
    existing = [w for w in weights if os.path.exists(w)]
    w = existing[-1] if existing else None
    engine = EnsamEngine(weights=w, device=device)
    vocab = load_vocab(weights)
    rows = []
    for e in entries:
        img = load_volume(os.path.join(data, e["image"]))
        ref = np.asarray(load_volume(os.path.join(data, e["label"])).array)
        names = [(int(v), canonical(n, vocab)) for v, n in (e.get("labels") or {}).items()]
        names = [(v, n) for v, n in names if n in vocab and int((ref == v).sum()) >= min_voxels]
        if max_labels:
            names = sorted(names, key=lambda vn: -int((ref == vn[0]).sum()))[:max_labels]
        if not names:
            continue
        image_name = os.path.basename(e["image"]).split(".")[0]
        ids = [vocab[n] for _, n in names]
        t = time.time()  # every flipped copy (and the error prediction) is segmented once for all the names
        flips = flip_predictions(engine, img.array, img.affine, ids, spacing_mm=spacing_mm)
        preds = {i: m[0] for i, m in flips.items()} if error_spacing_mm == spacing_mm else \
            engine.segment_labels(img.array, img.affine, ids, spacing_mm=error_spacing_mm)
        log(f"{image_name:>10}: {len(ids)} names in {time.time() - t:.1f}s")
        for value, name in names:
            u = disagreement(flips[vocab[name]])
            d = dice(np.asarray(preds[vocab[name]]) > 0, ref == value)
            rows.append({"image": image_name, "label": name,
                         "uncertainty": round(u, 5), "dsc": round(d, 5), "error": round(1 - d, 5)})
            log(f"{image_name:>10} {name:>24}: uncertainty {u:.3f}  DSC {d:.3f}")
    out: Dict = {"pairs": rows, "weights": os.path.basename(existing[-1]) if existing else None,
                 "spacing_mm": spacing_mm}
    if len(rows) >= 3:
        rho, p = spearmanr([r["uncertainty"] for r in rows], [r["error"] for r in rows])
        out["spearman_pairs"] = {"rho": float(rho), "p": float(p), "n": len(rows)}
    per_image: Dict[str, List[dict]] = {}
    for r in rows:
        per_image.setdefault(r["image"], []).append(r)
    img_rows = [{"image": k, "uncertainty": float(np.mean([r["uncertainty"] for r in v])),
                 "error": float(np.mean([r["error"] for r in v]))} for k, v in per_image.items()]
    out["images"] = img_rows
    if len(img_rows) >= 3:
        rho, p = spearmanr([r["uncertainty"] for r in img_rows], [r["error"] for r in img_rows])
        out["spearman_images"] = {"rho": float(rho), "p": float(p), "n": len(img_rows)}
    return out


def main(argv: Optional[List[str]] = None) -> None:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with dataset.json")
    p.add_argument("--weights", nargs="*", default=[os.path.join(here, "model", "pretrained_ensam.pt"),
                                                    os.path.join(here, "model", "ensam.pt")])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-labels", type=int, default=0, help="largest N structures per image (0 = all)")
    p.add_argument("--spacing-mm", type=float, default=5.0, help="as the uncertainty scoring method (default 5)")
    p.add_argument("--error-spacing-mm", type=float, default=3.0, help="as ensam_seg (default 3)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    res = evaluate(a.data, a.weights, a.device, a.max_labels, spacing_mm=a.spacing_mm,
                   error_spacing_mm=a.error_spacing_mm)
    for k in ("spearman_pairs", "spearman_images"):
        if k in res:
            print(f"{k}: rho = {res[k]['rho']:.3f} (p = {res[k]['p']:.3g}, n = {res[k]['n']})")
    if a.out:
        from lib.label_vocab import atomic_write_json

        atomic_write_json(res, a.out)


if __name__ == "__main__":
    main()
