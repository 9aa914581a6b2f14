"""NASC/LMOS: search an architecture and its device/server split point together.

space (what an arch is: nb201 cells, mbv2 blocks) -> supernet + train (one-shot accuracy) |
tabular (NB201 table) -> latency_table (every arch x cut on a link) -> search (constrained pick,
baselines, Pareto) -> export (ONNX with `nasc.split`); `api.run_search` runs it all, `nasc-search` is its CLI.
"""
