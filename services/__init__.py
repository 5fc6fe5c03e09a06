"""cbmir's services, one package per role; dependencies point down.

``ops`` (cli, serve, demo, reindex, evaluate) > ``query`` (the gRPC service and its client) >
``index`` | ``ingest`` (siblings) > ``dicom`` > ``core`` (settings, errors, vocabulary, broker).
Nothing here imports ``workers/``; ``models/`` imports nothing of ours. ``lint-imports`` checks
this (contracts in pyproject.toml). ``python -m services COMMAND`` is the ``cbmir`` command line.
"""
