"""Operating a cluster on this machine: `speed up`/`speed down` (launcher.py), certificates and tokens
of a secure cluster (certs.py), and the example cluster files (*.yaml) and systemd unit.

Layer rule: may import runtime.coordinator's token file and everything below it; the YAML schema
itself is runtime.core.cluster_file, since every process reads it.
"""
