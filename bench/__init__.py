"""Benchmarks of kessai's components on a real database server (``python -m bench.<name>``).

Every figure is also given as a ratio to a baseline measured in the same run on the same data,
so results from a shared or busy machine can still be compared. See docs/BENCHMARKS.md.
"""
