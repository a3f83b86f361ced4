"""Cluster deployments: the YAML schema, the local launcher and example clusters."""
