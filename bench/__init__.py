"""onnxpress benchmarks: `python -m bench [--quick] [--only NAME ...]`."""
