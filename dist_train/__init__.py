"""dist_train: shard a labeled image set once, train any timm backbone with DDP."""

__version__ = "0.1.0"
