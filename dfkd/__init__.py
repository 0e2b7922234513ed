"""dfkd: data-free knowledge distillation from a wild pool of unlabeled images.

The library behind the CLI; every command is one call (imports happen on first use, so
``import dfkd`` stays light). The names differ from the subpackages' (``dfkd.distill`` is a
package, ``dfkd.distill_student`` the function), so that neither hides the other::

    import dfkd

    teacher = dfkd.load_card("teacher/model.yaml")
    sel = dfkd.select_pool(teacher, "wild/", "runs/select", num_images=2000)
    run = dfkd.distill_student(teacher, "resnet8", [sel.files["selected"]], "runs/student",
                               dfkd.DistillConfig(method="kd", epochs=20))
    print(dfkd.evaluate_model(dfkd.load_card(run.card), "test/").top1)
"""

__version__ = "0.2.0"

_API = {  # name -> (module, attribute)
    "load_card": ("dfkd.cards", "load_card"),
    "load_teacher": ("dfkd.teacher", "load_teacher"),
    "load_model": ("dfkd.cards", "load_model"),
    "select_pool": ("dfkd.select.run", "select_pool"),
    "merge_shards": ("dfkd.select.run", "merge_shards"),
    "SelectConfig": ("dfkd.select.run", "SelectConfig"),
    "pu_train": ("dfkd.pu.train", "pu_train"),
    "PuConfig": ("dfkd.pu.train", "PuConfig"),
    "expand": ("dfkd.pu.expand", "expand"),
    "ExpandConfig": ("dfkd.pu.expand", "ExpandConfig"),
    "distill_student": ("dfkd.distill.run", "distill"),
    "DistillConfig": ("dfkd.distill.run", "DistillConfig"),
    "train_classifier": ("dfkd.train.classifier", "train_classifier"),
    "LoopConfig": ("dfkd.train.loop", "LoopConfig"),
    "evaluate_model": ("dfkd.evaluate", "evaluate"),
    "export_model": ("dfkd.export", "export_model"),
    "write_report": ("dfkd.report", "write_report"),
    "DfkdError": ("dfkd.errors", "DfkdError"),
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dfkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
