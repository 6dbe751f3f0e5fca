"""Defaults of ``examples/mnist.py``: an MLP on scikit-learn's digits."""

from examples.configs import Config

DATASETS = ("digits", "mnist", "fashion_mnist")


def get_config() -> Config:
  return Config(dataset="digits", model="mlp", hidden=(512, 512),
                optimizer="sgd", learning_rate=0.1, weight_decay=5e-4,
                warmup_epochs=1.0, epochs=20, batch_size=64)
