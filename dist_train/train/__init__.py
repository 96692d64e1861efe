"""Training: the Trainer and the components it calls (checkpoint, evaluator, stager, optim,
guard, logging)."""
