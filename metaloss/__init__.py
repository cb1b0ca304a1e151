"""metaloss: meta-learning loss functions with fixed baselines, parametric losses and a
bi-level engine vectorised over tasks with torch.func."""

__version__ = "0.1.0"
