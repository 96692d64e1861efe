"""Benchmarks behind `python -m dist_train.bench`: the loader, the trainer step, the shard writer."""
