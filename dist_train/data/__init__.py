"""The data path: transforms (uint8, per-sample seeds), shard readers (equal steps, exact
evaluation), loaders, and device-side batch preparation."""
