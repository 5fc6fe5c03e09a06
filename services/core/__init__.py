"""Foundations every other package uses: settings, errors, the shared vocabulary, logging, the
broker and process helpers."""
