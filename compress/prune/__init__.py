"""Pruning stages. Each module holds pure mask maths plus one registered stage."""
