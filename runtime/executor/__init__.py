"""Runs a model's stages: the stage graphs in ONNX Runtime, their KV caches, and the tick executor that
applies a scheduler's plan. Used by the single-process runtime and by every node."""
