"""SPEED runtime: speculative pipelined execution of weight-shared decoders."""

__version__ = "0.1.0"
