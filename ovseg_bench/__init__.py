"""ovseg-bench: one exact, reproducible harness for zero-shot semantic segmentation."""
__version__ = "0.1.0"
