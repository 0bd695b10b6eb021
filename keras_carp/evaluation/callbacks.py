"""Monitoring during ``fit``: ``KNNMonitor`` and ``CollapseMonitor`` now live in ``keras_carp.callbacks``."""

from keras_carp.callbacks import CollapseMonitor, KNNMonitor

__all__ = ["CollapseMonitor", "KNNMonitor"]
