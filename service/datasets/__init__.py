"""Offline datasets (Minari): the store beside the model repository."""
