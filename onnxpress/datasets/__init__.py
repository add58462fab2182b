"""Data files bundled with onnxpress for its model zoo (see docs/data.md)."""
