"""Datasets, the datamodule, robust image I/O and the embedded sample photographs."""
