"""One dataset item = one patient: how a site's slices reach Opacus as privacy units."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, get_worker_info

if TYPE_CHECKING:  # typing only: site_data re-exports this module's class
    from medgen.data.site_data import SiteData

logger = logging.getLogger(__name__)

__all__ = ["PatientDataset"]


class PatientDataset(Dataset):
    """Dataset whose item is ONE PATIENT: one of the patient's slices, drawn at random.

    Why patient-level DP stays exact: Opacus treats a dataset item as a record. Here the
    items are patients, so Poisson sampling includes each PATIENT independently with
    probability q = batch_size / num_patients (what DPDataLoader computes from
    len(dataset) = num_patients), and a sampled patient contributes exactly one example,
    hence one per-sample gradient clipped to C. Adding or removing a patient adds or
    removes one item and changes the noisy sum by at most C: the (epsilon, delta) the
    accountant reports is per patient, whatever the number of slices. Which slice is used
    is chosen by this dataset's own seeded generator, independent of the data, so it is
    part of the randomised mechanism, not a leak. (Items as slices would instead let one
    patient enter a batch many times and weaken the guarantee by up to the slice count.)

    Items are (image [1,H,W] float32, label [H,W] int64), or with a site loaded as volumes
    (``load_site(..., dims=3)``) one of the patient's volumes (image [1,D,H,W], label
    [D,H,W]): the item is still the patient, so the guarantee is the same. A paired site
    (``SiteData.paired``, dataset.toml ``[paired]``) adds the same row's paired image third:
    (image, label, paired image), still one patient. A site without labels returns
    an all-zero label map; check ``has_labels`` before using it. Always returning a tensor
    keeps DPDataLoader's empty Poisson batches well-formed ([0,1,H,W] and [0,H,W]).
    Pass a ``generator_seed`` that changes every round (e.g. from run seed, round, site),
    so rounds draw different slices; DataLoader workers each derive their own stream.
    """

    def __init__(self, site_data: "SiteData", generator_seed: int):
        self.images = site_data.images
        self.labels = site_data.labels
        self.has_labels = site_data.has_labels  # False: the label maps are all-zero placeholders
        if not self.has_labels:
            logger.warning("this site has no label maps: every item carries an all-zero "
                           "placeholder label map (has_labels is False); a recipe that needs "
                           "labels must refuse it")
        self.num_patients = site_data.num_patients
        self.manifest = site_data.manifest
        self.schema = site_data.schema
        self.dims = site_data.dims
        self.paired = site_data.paired  # None unless the manifest declares [paired]
        index = site_data.patient_index
        self._counts = torch.bincount(index, minlength=self.num_patients)
        self._starts = torch.cumsum(self._counts, 0) - self._counts
        self._order = torch.argsort(index, stable=True)
        self._seed = int(generator_seed)
        self._generator = torch.Generator().manual_seed(self._seed)
        self._worker_seed: int | None = None
        self._worker_generator: torch.Generator | None = None

    def __len__(self) -> int:
        return self.num_patients

    def __getitem__(self, patient: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.num_patients <= patient < self.num_patients:
            raise IndexError(f"patient {patient} out of range (site has {self.num_patients})")
        patient = patient % self.num_patients
        count = int(self._counts[patient])
        offset = int(torch.randint(count, (1,), generator=self._rng())) if count > 1 else 0
        row = int(self._order[int(self._starts[patient]) + offset])
        image = self.images[row].clone()
        label = (self.labels[row].clone() if self.labels is not None
                 else torch.zeros(image.shape[-2:], dtype=torch.int64))
        if self.paired is not None:
            return image, label, self.paired[row].clone()
        return image, label

    def _rng(self) -> torch.Generator:
        worker = get_worker_info()
        if worker is None:
            return self._generator
        if self._worker_seed != worker.seed:  # a worker's copy: its own stream per epoch
            self._worker_seed = worker.seed
            mixed = (self._seed * 1_000_003 + worker.seed) % (2**63 - 1)
            self._worker_generator = torch.Generator().manual_seed(mixed)
        return self._worker_generator
