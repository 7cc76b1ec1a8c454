"""Inference backends behind one interface (embedded ONNX Runtime now, Triton next)."""
