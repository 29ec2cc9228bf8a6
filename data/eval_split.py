"""Which of a site's patients are reserved for federated evaluation (never trained on).

The split is a pure function of the site's name and its patient numbers (``SiteData``
numbers patients 0..P-1 by their first record's file name, the same in every run on the
same files): every patient gets the rank of ``sha256("medgen-federated-eval-v1", site,
patient)``, and the ``round(fraction x P)`` lowest ranks (at least ``MIN_EVAL_PATIENTS``)
are evaluation patients. Within them, alternating ranks form the two halves that
evaluation needs (conditioning half A, reference half B; evaluation/federated_eval.py).
Nothing random, nothing stored: every round and every restart of a study reserves the same
patients, and the training side sees only the rest (``training_part``), so its dataset,
its ``num-examples`` and its Poisson sample rate count training patients only.

A site that adds patients between runs renumbers them, so the split can change between
studies; within a study the files do not change (the data cache key says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from medgen.data.site_data import SiteData

SPLIT_KEY = "medgen-federated-eval-v1"
MIN_EVAL_PATIENTS = 4       # two per half: a pooled histogram of one patient is no set
MIN_TRAIN_PATIENTS = 1


@dataclass(frozen=True)
class EvalSplit:
    """Patient numbers (of the full site) in each part."""

    train: tuple[int, ...]
    half_a: tuple[int, ...]   # conditioning half: its maps condition the generator
    half_b: tuple[int, ...]   # reference half

    @property
    def evaluation(self) -> tuple[int, ...]:
        return tuple(sorted(self.half_a + self.half_b))


def split_patients(site: str, num_patients: int, fraction: float) -> EvalSplit:
    """The module docstring's split; fraction 0 keeps every patient for training."""
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"run-config field 'federated-eval-fraction' must be in [0, 0.5], got {fraction}")
    if fraction == 0:
        return EvalSplit(tuple(range(num_patients)), (), ())
    count = max(MIN_EVAL_PATIENTS, round(fraction * num_patients))
    if num_patients - count < MIN_TRAIN_PATIENTS:
        raise ValueError(f"site {site!r} has {num_patients} patients: too few to reserve {count} for "
                         f"federated evaluation (at least {MIN_EVAL_PATIENTS}) and still train; "
                         "set federated-eval-fraction = 0 for this run")
    ranked = sorted(range(num_patients), key=lambda p: _rank(site, p))
    chosen = ranked[:count]
    return EvalSplit(tuple(sorted(ranked[count:])), tuple(sorted(chosen[0::2])),
                     tuple(sorted(chosen[1::2])))


def patient_subset(data: SiteData, patients: tuple[int, ...]) -> SiteData:
    """``data`` restricted to ``patients`` (renumbered 0..len-1 in the given order)."""
    new_number = torch.full((data.num_patients,), -1, dtype=torch.int64)
    new_number[torch.tensor(patients, dtype=torch.int64)] = torch.arange(len(patients))
    rows = new_number[data.patient_index] >= 0
    return dataclasses.replace(
        data, images=data.images[rows], labels=data.labels[rows] if data.labels is not None else None,
        patient_index=new_number[data.patient_index[rows]], num_patients=len(patients),
        record_index=data.record_index[rows] if data.record_index is not None else None,
        paired=data.paired[rows] if data.paired is not None else None)


def training_part(data: SiteData, site: str, fraction: float) -> SiteData:
    """The site's data without its evaluation patients (all of it when fraction is 0)."""
    if fraction == 0:
        return data
    return patient_subset(data, split_patients(site, data.num_patients, fraction).train)


def _rank(site: str, patient: int) -> bytes:
    return hashlib.sha256(f"{SPLIT_KEY}\x00{site}\x00{int(patient)}".encode()).digest()
