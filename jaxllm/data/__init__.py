"""Data: reading sources, cleaning and deduplicating them (`stage: data`), and grain pipelines."""
