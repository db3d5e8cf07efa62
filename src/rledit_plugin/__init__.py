"""rledit-plugin: RLEdit (Reinforced Lifelong Editing, ICML 2025) for EasyEdit.

Public API::

    from rledit_plugin import RLEditHyperParams, RLEditor, train_hypernetwork
    hp = RLEditHyperParams.from_hparams("hparams/RLEdit/tiny.yaml")
    editor = RLEditor(model, tok, hp)       # loads hp.archive when set
    editor.edit(records)                    # lifelong: accumulates, never reverts

Importing this package registers "RLEdit" with EasyEdit whenever ``easyeditor``
is (or later gets) imported; without EasyEdit it registers nothing.
"""
__version__ = "0.1.0"

from .core.archive import load_archive, save_archive
from .core.editor import RLEditor
from .core.trainer import train_hypernetwork
from .data import EditRecord, load_records, records_from_requests
from .evaluation import run_stream, write_report
from .hparams import RLEditHyperParams, RLEditTrainingHyperParams
from .hosts import easyedit as _easyedit_host  # noqa: F401  (post-import registration hook)


def apply_rledit_to_model(*args, **kwargs):
    """EasyEdit's apply contract (see :mod:`rledit_plugin.hosts.easyedit`)."""
    return _easyedit_host.apply_rledit_to_model(*args, **kwargs)


__all__ = [
    "RLEditHyperParams", "RLEditTrainingHyperParams", "RLEditor", "train_hypernetwork",
    "save_archive", "load_archive", "EditRecord", "load_records", "records_from_requests",
    "run_stream", "write_report", "apply_rledit_to_model",
]
