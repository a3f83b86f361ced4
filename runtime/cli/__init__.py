"""The `speed` command line: main.py builds the parser from one module per command family (models,
decode, cluster, bench, security); arguments.py holds what they share.

Layer rule: the top; each command imports what it runs only when it runs, so `speed node` loads no
torch and `--help` loads almost nothing.
"""
