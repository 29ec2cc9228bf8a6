"""medgen.data: everything medgen knows about data, independent of any node role.

What lives here (issue 14): the dataset manifest (``dataset.toml``: modality, intensity
units and normalisation, label schema, geometry policy, 2D or 3D), the label schema, the
modality-aware intensity maps with their exact inverse, writing images back in physical
units (NIfTI, DICOM), the public label bank (builder and loader), and the site data
layer: the one site-folder walk, readers, DICOM series, cache, site dataset, held-out
data and ``data check``.

Importing this package is light (numpy only); nibabel and pydicom load where used.
"""

from medgen.data.errors import DataError, LabelValueError, ManifestError, RemapError
from medgen.data.label_schema import LabelSchema
from medgen.data.manifest import (DATASET_TOML, DatasetManifest, GeometryPolicy,
                                  IntensityPolicy, load_manifest)

__all__ = ["DataError", "LabelValueError", "ManifestError", "RemapError", "LabelSchema",
           "DATASET_TOML", "DatasetManifest", "GeometryPolicy", "IntensityPolicy",
           "load_manifest"]
