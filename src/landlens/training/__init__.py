"""Training scene classifiers: configuration, losses, transfer strategies, the training loop and evaluation."""
