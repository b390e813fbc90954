"""MiniCache inference worker: transformers models whose KV cache is held compressed,
plus the evaluation and calibration commands (`minicache-worker eval|calibrate`)."""

__version__ = "0.1.0"
