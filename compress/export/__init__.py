"""Checkpoint writers for formats engines load natively (compressed-tensors)."""
