"""pbt: a small, dependable PyTorch training library in the Keras tradition.

Importing this package is cheap: submodules (engine, callbacks, schedulers, prune, ...)
are imported by the user, and heavy dependencies are imported where they are used.
"""

__version__ = "0.1.0"
