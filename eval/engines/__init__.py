"""Inference engines behind one interface (eval.engines.base), opened by name through the
table in eval.engines.registry; vLLM is imported lazily."""

from eval.engines.registry import check_engines, engine_class, engine_facts, open_engine

__all__ = ["check_engines", "engine_class", "engine_facts", "open_engine"]
