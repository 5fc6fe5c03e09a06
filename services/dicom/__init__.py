"""DICOM in and out: reading and decoding, building objects, EDF signals, sending, and the
pynetdicom extensions."""
