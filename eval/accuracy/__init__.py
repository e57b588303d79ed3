"""Accuracy metrics: perplexity (and, next, multiple-choice tasks)."""
