"""dfkd: data-free knowledge distillation from a wild pool of unlabeled images."""

__version__ = "0.2.0"
