"""The stable label-name vocabulary of the pre-trained model: name -> concept token id.

Ids index the network's learned label embeddings (``NetworkConfig.num_labels`` = 128), so they must never change
once weights are trained with them. Order: the 117 TotalSegmentator v2 "total" structures (token id = the
TotalSegmentator class id minus 1), then the brain tissue classes of the MNI152 training volume. New names (added
by fine-tuning) take the next free ids (see ``lib.label_vocab.extend_vocab``).
"""

from __future__ import annotations

from typing import Dict, Optional

__all__ = ["TOTAL_NAMES", "BRAIN_NAMES", "LABEL_NAMES", "LABEL_IDS", "ALIASES", "label_id", "label_name",
           "vocabulary"]

# TotalSegmentator v2 class_map["total"], in class-id order 1..117.
TOTAL_NAMES = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left",
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus", "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
    "kidney_cyst_left", "kidney_cyst_right",
    "sacrum", "vertebrae_S1",
    *(f"vertebrae_L{i}" for i in range(5, 0, -1)),
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)),
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)),
    "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk",
    "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right",
    "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
    "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left", "clavicula_right",
    "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
    "iliopsoas_left", "iliopsoas_right", "brain", "skull",
    *(f"rib_left_{i}" for i in range(1, 13)),
    *(f"rib_right_{i}" for i in range(1, 13)),
    "sternum", "costal_cartilages",
)
# Brain tissue classes of the MNI152 training volume ("brain" itself is a TotalSegmentator name above).
BRAIN_NAMES = ("white_matter", "grey_matter", "brain_other")

LABEL_NAMES = TOTAL_NAMES + BRAIN_NAMES
LABEL_IDS: Dict[str, int] = {n: i for i, n in enumerate(LABEL_NAMES)}
# Other spellings that clients or datasets use for the same structure.
ALIASES = {"gray_matter": "grey_matter", "gm": "grey_matter", "wm": "white_matter", "csf": "brain_other",
           "left_kidney": "kidney_left", "right_kidney": "kidney_right", "ivc": "inferior_vena_cava",
           "portal_vein": "portal_vein_and_splenic_vein"}
# Case is tolerated: _key lower-cases, so the names with capitals (vertebrae_L1, vertebrae_C7, vertebrae_S1, ...)
# need their lower-case spelling as an alias, else label_id("vertebrae_L1") is None.
ALIASES.update({n.lower(): n for n in LABEL_NAMES if n != n.lower()})

assert len(TOTAL_NAMES) == 117 and len(set(LABEL_NAMES)) == len(LABEL_NAMES)


def _key(name: str) -> str:
    k = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(k, k)


def label_id(name: str) -> Optional[int]:
    """Token id of a structure name (case, spaces and known aliases tolerated), or None if unknown."""
    return LABEL_IDS.get(_key(name))


def label_name(idx: int) -> str:
    return LABEL_NAMES[idx]


def vocabulary() -> Dict[str, int]:
    """A copy of the name -> id table (what is written next to the weights as ``*_labels.json``)."""
    return dict(LABEL_IDS)
