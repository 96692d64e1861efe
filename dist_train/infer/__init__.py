"""Inference, shared by training's evaluation and the predict / evaluate / ensemble commands:
the accelerator, inference with an exact-once gather, loading a trained model, prediction files
and the metrics computed from them."""
