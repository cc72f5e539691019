"""Continual-learning metrics, the frozen-feature baselines every result stands beside, and plots."""
