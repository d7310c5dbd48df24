"""Experiment modules: ``python -m experiments.NAME`` runs every discovery method on one task."""
