"""dicomnode: a DICOM node that quality-checks and triages every incoming series."""

__version__ = "0.1.0"
