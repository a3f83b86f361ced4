"""Worker nodes: run pipeline stages of a bundle with ONNX Runtime. Needs no torch."""
