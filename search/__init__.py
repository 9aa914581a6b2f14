"""Deciding where to cut: latency models, cut choice, Pareto fronts, and the NAS (search.nas)."""
