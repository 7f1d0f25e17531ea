"""Micro-benchmarks of the operators (``compact``: compact_; ``attention``: attention_with_scores)."""
