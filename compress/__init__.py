"""Squeeze compression side: recipes, stages, pipeline, model loading."""

__version__ = "0.1.0"
