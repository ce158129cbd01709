"""Data: readers (one per file format) -> records -> dataset -> loaders."""
