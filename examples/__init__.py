"""Example trainers for jbn: MNIST / digits (MLP) and CIFAR-10 (ResNet).

Run them as scripts (``python examples/mnist.py``) or import them: every
entry point has ``main(argv)``.
"""
