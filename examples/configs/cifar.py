"""Defaults of ``examples/cifar.py``: a small ResNet on CIFAR-10."""

from examples.configs import Config

DATASETS = ("cifar10", "synthetic")


def get_config() -> Config:
  return Config(dataset="cifar10", model="resnet", width=16,
                stage_sizes=(1, 1, 1), optimizer="sgd", learning_rate=0.1,
                weight_decay=5e-4, warmup_epochs=1.0, epochs=30,
                batch_size=128, augment=True)
