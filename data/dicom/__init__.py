"""DICOM ingestion: scan a PACS export, group and order series, decode to physical units.

Entry point for the site loader: ``DicomSeriesReader`` (registered in
medgen.data.readers). Building blocks: ``scan_folder`` -> ``group_series`` ->
``decode_series``.
"""

from medgen.data.dicom.pixels import PixelOptions, decode_series
from medgen.data.dicom.reader import DicomReadOptions, DicomSeriesReader, read_folder
from medgen.data.dicom.scan import Problem, is_dicom_file, scan_folder
from medgen.data.dicom.series import Series, group_series

__all__ = ["DicomReadOptions", "DicomSeriesReader", "PixelOptions", "Problem", "Series",
           "decode_series", "group_series", "is_dicom_file", "read_folder", "scan_folder"]
