"""rledit-plugin: RLEdit (Reinforced Lifelong Editing, ICML 2025) for EasyEdit.

Public API::

    from rledit_plugin import RLEditHyperParams, RLEditor, train_hypernetwork
    hp = RLEditHyperParams.from_hparams("hparams/RLEdit/tiny.yaml")
    editor = RLEditor(model, tok, hp)       # loads hp.archive when set
    editor.edit(records)                    # lifelong: accumulates, never reverts

Importing this package is light (nothing heavy is imported until a name is
used) and registers "RLEdit" with EasyEdit whenever ``easyeditor`` is, or
later gets, imported; without EasyEdit it registers nothing.
"""
import importlib

from .hosts.easyedit import install_import_hook as _install_import_hook

__version__ = "0.1.0"

_EXPORTS = {
    "RLEditHyperParams": "hparams", "RLEditTrainingHyperParams": "hparams",
    "RLEditor": "core.editor", "train_hypernetwork": "core.trainer",
    "save_archive": "core.archive", "load_archive": "core.archive",
    "EditRecord": "data", "load_records": "data", "records_from_requests": "data",
    "run_stream": "evaluation", "write_report": "evaluation",
    "export_lora": "export", "apply_rledit_to_model": "hosts.easyedit",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


_install_import_hook()
