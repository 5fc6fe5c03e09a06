"""cbmir's machine-learning package.

Serving imports only ``models.preprocess``, ``models.eeg`` and ``models.runtime`` (numpy, Pillow,
onnxruntime). ``models.network``, ``models.train`` and ``models.export`` need torch and are for
training/export only. See ``models/README.md``.
"""
