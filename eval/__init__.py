"""Squeeze evaluation side: engines, accuracy, speed, reports."""
