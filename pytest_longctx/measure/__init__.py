"""Measurement: what a case is judged with, as plain numbers. The timer, statistics,
rooflines (bandwidth, matmul rate), memory probes, preflight, the inter-process lock,
the seeded inputs and workloads, the metrics and bounds a figure is compared against,
and the golden-logits file with the prefill that reads it.

May import the contract and ``access`` only: no pytest session, no presentation.
"""
