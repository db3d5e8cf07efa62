"""Compatibility for running EasyEdit here: multimodal stand-ins and an opt-in CPU shim.

Part of the EasyEdit host (:mod:`.easyedit` is the entry point); nothing else in
rledit_plugin imports this.

**Stand-ins.** ``import easyeditor`` imports its multimodal code, which needs
torchvision/timm (blip2, blip processors) and, in GitHub HEAD, av/cv2/qwen_vl_utils
(LLaVA-OneVision and Qwen2-VL processors).  :func:`install_standins` puts empty
modules with placeholder classes into ``sys.modules`` for exactly those whose
dependencies are missing, so the text-editing part imports; using a placeholder
raises an ImportError that says why.

**CPU shim** (opt-in; the PyPI release 0.0.1.dev0 only).  The release hard-codes
``.to(f'cuda:{hparams.device}')`` in its editor, its evaluation, FT, ROME, MEMIT,
MEND, SERAC, LoRA, KN and its trainer (``device: 0`` -> "Torch not compiled with
CUDA"; ``device: cpu`` -> "Invalid device string 'cuda:cpu'").  While the shim is
on, CUDA device requests are redirected to the CPU where torch turns a device into
memory:

- ``Tensor.to`` / ``Module.to`` / ``Tensor.cuda`` / ``Module.cuda`` (this also
  covers ``BatchEncoding.to`` and EasyEdit's ``dict_to``, which call ``Tensor.to``);
- the ``device=`` keyword of torch's tensor factories (``torch.zeros``, ``torch.tensor``, ...);
- ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` report 0.

Any string starting with ``cuda`` (including the release's ``'cuda:cpu'``), a
``torch.device('cuda', ...)`` and a bare device index are redirected.  Out of
reach: code that builds ``torch.device(f'cuda:{device}')`` itself with
``device: cpu`` (the release's FT, IKE, LoRA, MEND and ICL evaluation) -- use
``device: 0`` there, which builds a valid ``cuda:0`` object that the shim then
redirects.  GitHub HEAD is device-clean and needs no shim (``device: cpu``).  The
patches are process-wide while active; :func:`disable_cpu_shim` (or leaving
``with cpu_shim():``) restores torch exactly.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import threading
import types
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

# Multimodal modules `import easyeditor` pulls in: the third-party modules they
# need, and the names other EasyEdit modules import from them.
_MULTIMODAL = {
    "easyeditor.trainer.blip2_models": (("timm", "torchvision"), ("Blip2OPT", "MiniGPT4")),
    "easyeditor.dataset.processor.blip_processors": (("torchvision",), ("BlipImageEvalProcessor",)),
    # GitHub HEAD only
    "easyeditor.dataset.processor.llavaov_processors": (("av", "cv2"), ("LLaVAOneVisionProcessor",)),
    "easyeditor.dataset.processor.qwen2vl_processors": (("av", "cv2", "qwen_vl_utils"),
                                                         ("Qwen2VLProcessor",)),
}
# GitHub HEAD's UnKE modules break on transformers newer than 5.5.
_UNKE = {"easyeditor.models.unke": ("unkeHyperParams", "apply_unke_to_model"),
         "easyeditor.models.unke_ARE": ("unkeAREHyperParams", "apply_unke_ARE_to_model")}


def _missing(modules: Sequence[str]) -> List[str]:
    out = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def _placeholder(name: str, module: str, why: str) -> type:
    def __init__(self, *args, **kwargs):
        raise ImportError(f"{module}.{name} is a stand-in installed by rledit_plugin ({why}); "
                          "install EasyEdit's multimodal dependencies to use it")
    return type(name, (), {"__init__": __init__, "__module__": module})


def _transformers_newer_than(major: int, minor: int) -> bool:
    try:
        from importlib.metadata import version
        parts = version("transformers").split(".")
        return (int(parts[0]), int(parts[1])) > (major, minor)
    except Exception:   # unknown version: leave the real modules alone
        return False


def install_standins() -> List[str]:
    """Stand-ins for EasyEdit's unimportable multimodal modules; returns those installed.

    Only modules whose third-party dependencies are missing are replaced; a
    stand-in for a module that this EasyEdit version lacks is never imported.
    """
    wanted = dict(_MULTIMODAL)
    if _transformers_newer_than(5, 5):
        wanted.update({name: ((), names) for name, names in _UNKE.items()})
    installed = []
    for module, (deps, names) in wanted.items():
        if module in sys.modules:
            continue
        missing = _missing(deps)
        if deps and not missing:
            continue
        why = f"missing {', '.join(missing)}" if missing else "incompatible transformers"
        stub = types.ModuleType(module, f"rledit_plugin stand-in ({why})")
        stub.__all__ = []                      # `from ... import *` brings nothing in
        stub.__rledit_standin__ = True
        for name in names:
            setattr(stub, name, _placeholder(name, module, why))
        sys.modules[module] = stub
        installed.append(module)
    return installed


# --------------------------------------------------------------------------- CPU shim

_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand",
              "randn", "randint", "randperm", "eye", "linspace", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand_like", "randn_like", "randint_like")

_lock = threading.Lock()
_depth = 0
_saved: List[Tuple[Any, str, Any]] = []   # (owner, attribute, own original or _INHERITED)
_INHERITED = object()


def _is_cuda_request(device: Any) -> bool:
    import torch

    if isinstance(device, bool):
        return False
    if isinstance(device, int):            # a bare index means a CUDA device
        return True
    if isinstance(device, str):
        return device.strip().lower().startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _redirect(args: tuple, kwargs: dict, first_positional: bool) -> Tuple[tuple, dict]:
    if first_positional and args and _is_cuda_request(args[0]):
        args = ("cpu",) + tuple(args[1:])
    if "device" in kwargs and _is_cuda_request(kwargs["device"]):
        kwargs = dict(kwargs, device="cpu")
    return args, kwargs


def _wrap_to(original: Callable) -> Callable:
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        args, kwargs = _redirect(args, kwargs, first_positional=True)
        return original(self, *args, **kwargs)
    return to


def _wrap_cuda(_original: Callable) -> Callable:
    @functools.wraps(_original)
    def cuda(self, device=None, *args, **kwargs):
        return self.to("cpu")
    return cuda


def _wrap_factory(original: Callable) -> Callable:
    @functools.wraps(original)
    def factory(*args, **kwargs):
        args, kwargs = _redirect(args, kwargs, first_positional=False)
        return original(*args, **kwargs)
    return factory


def _zero(*_args, **_kwargs) -> int:
    return 0


def _patches() -> Dict[Tuple[Any, str], Callable]:
    import torch

    patches: Dict[Tuple[Any, str], Callable] = {
        (torch.Tensor, "to"): _wrap_to(torch.Tensor.to),
        (torch.nn.Module, "to"): _wrap_to(torch.nn.Module.to),
        (torch.Tensor, "cuda"): _wrap_cuda(torch.Tensor.cuda),
        (torch.nn.Module, "cuda"): _wrap_cuda(torch.nn.Module.cuda),
        (torch.cuda, "max_memory_allocated"): _zero,
        (torch.cuda, "max_memory_reserved"): _zero,
    }
    for name in _FACTORIES:
        if hasattr(torch, name):
            patches[(torch, name)] = _wrap_factory(getattr(torch, name))
    return patches


def _warm_identity_caches() -> None:
    """Let torch cache its own factory functions before they are wrapped.

    ``torch.device('meta')`` / ``set_default_device`` recognise factories by
    identity from a set built lazily (and cached) on first use; built while the
    shim is on, it would hold the wrappers and miss the real functions forever.
    """
    try:
        from torch.utils._device import _device_constructors
        _device_constructors()
    except (ImportError, AttributeError):
        pass


def enable_cpu_shim() -> None:
    """Redirect CUDA device requests to the CPU (re-entrant: nested calls count)."""
    global _depth
    with _lock:
        _depth += 1
        if _depth > 1:
            return
        _warm_identity_caches()
        for (owner, attr), replacement in _patches().items():
            _saved.append((owner, attr, vars(owner).get(attr, _INHERITED)))
            setattr(owner, attr, replacement)


def disable_cpu_shim() -> None:
    """Undo one :func:`enable_cpu_shim`; the last one restores torch exactly."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth:
            return
        while _saved:
            owner, attr, original = _saved.pop()
            if original is _INHERITED:     # e.g. Tensor.to lives on torch._C.TensorBase
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def cpu_shim_active() -> bool:
    return _depth > 0


@contextlib.contextmanager
def cpu_shim() -> Iterator[None]:
    """``with cpu_shim(): ...`` runs the PyPI release's CUDA-only code on the CPU."""
    enable_cpu_shim()
    try:
        yield
    finally:
        disable_cpu_shim()


@contextlib.contextmanager
def patched(owner: Any, **replacements: Any) -> Iterator[None]:
    """``owner.<name> = value`` for each keyword while the block runs, the originals put back
    after: how every host fix around one EasyEdit call is applied (EasyEdit itself is never edited)."""
    saved = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)
