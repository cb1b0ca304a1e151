"""Console entry points (Hydra apps). Only this package imports wandb."""
