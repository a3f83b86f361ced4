"""Benchmarks behind `speed bench`: plain and speculative decoding in one process, through a local
cluster, with many clients, and with nodes killed at random.

Layer rule: may import anything below the command line (deploy's LocalCluster starts real processes).
"""
