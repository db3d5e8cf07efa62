"""Model plumbing: find edited modules, know their weight layout, pick defaults.

Two layouts exist.  ``nn.Linear`` stores its weight ``(d_out, d_in)``; GPT-2's
``Conv1D`` stores it ``(d_in, d_out)``.  Everything above this module speaks
``d_in x d_out`` and asks :func:`weight_view` for the orientation.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

try:  # transformers keeps Conv1D here in 4.x and 5.x
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a clear error lists near matches otherwise."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        tail = name.split(".")[-1]
        near = [n for n, _ in model.named_modules() if n.endswith(tail)][:6]
        raise KeyError(f"model has no module '{name}'" +
                       (f"; modules ending in '{tail}': {near}" if near else "")) from None


def io_dims(module: nn.Module) -> Tuple[int, int]:
    """``(d_in, d_out)`` of an editable linear map."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):      # a container (a whole MLP block, a layer)
        children = [n for n, _ in module.named_children()][:6]
        raise TypeError(f"cannot edit {type(module).__name__}: it has no weight of its own; name one "
                        f"of its linear maps (its children: {children})")
    if is_conv1d(module):
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(module, nn.Linear):
        return int(w.shape[1]), int(w.shape[0])
    raise TypeError(f"cannot edit {type(module).__name__}: only nn.Linear and GPT-2 Conv1D")


def is_transposed(module: nn.Module) -> bool:
    """True when the stored weight is ``(d_out, d_in)`` (``nn.Linear``)."""
    return not is_conv1d(module)


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as ``(d_out, d_in)`` (a view, no copy)."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


# Upper-middle MLP projections, after rledit-algorithm.md section 1.
_FAMILY_PATTERNS: Dict[str, Tuple[str, Sequence[str]]] = {
    "gpt2": ("transformer.h.{i}.mlp", ("c_fc", "c_proj")),
    "gptj": ("transformer.h.{i}.mlp", ("fc_in", "fc_out")),
    "llama": ("model.layers.{i}.mlp", ("gate_proj", "up_proj")),
    "mistral": ("model.layers.{i}.mlp", ("down_proj",)),
    "gemma2": ("model.layers.{i}.mlp", ("gate_proj", "up_proj")),
    "qwen2": ("model.layers.{i}.mlp", ("gate_proj", "up_proj")),
}


def model_family(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "unknown"))


def num_layers(model: nn.Module) -> int:
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError("cannot tell the number of layers from the model config")


def default_edit_modules(model: nn.Module, n_layers: int | None = None) -> List[str]:
    """Default edited modules: MLP projections of the upper-middle third of the stack."""
    family = model_family(model)
    if family not in _FAMILY_PATTERNS:
        raise ValueError(f"no default edit modules for model type '{family}'; "
                         "list them in the hparams (inner_params)")
    prefix, names = _FAMILY_PATTERNS[family]
    total = num_layers(model)
    count = n_layers or max(1, total // 3)
    start = max(0, (2 * total) // 3 - count)
    start = min(start, total - count)
    layers = range(start, start + count)
    return [f"{prefix.format(i=i)}.{n}" for i in layers for n in names]


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embedding's device (right for device-mapped models too)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    if get_emb is not None:
        try:
            emb = get_emb()
            if emb is not None and getattr(emb, "weight", None) is not None:
                return emb.weight.device
        except (NotImplementedError, AttributeError):
            pass
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def output_logits(output) -> torch.Tensor:
    """Logits from a model's output (a Hugging Face output, a tuple or a bare tensor)."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


# config attributes of families whose logits are post-processed after the output head
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                         "lm_head_multiplier")


def answer_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  rows: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
                  edited: Sequence[nn.Module] = ()) -> torch.Tensor:
    """Logits ``(n, vocab)`` at the ``n`` positions ``rows`` selects (a bool mask, or the
    tuple of its ``nonzero(as_tuple=True)`` indices: the same rows, without a GPU sync).

    The output head runs on those rows only: an edit or scoring batch has a few answer
    tokens among many prompt tokens, and the vocabulary projection is a large share of a
    small model's forward.  Models without a separable head, with post-processed logits,
    or whose head is among the ``edited`` modules (its hooks expect full activations) run
    the plain forward and are indexed afterwards; both give the same numbers.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    base = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    if (head is not None and base is not model and not any(m is head for m in edited)
            and all(getattr(config, a, None) is None for a in _LOGIT_POSTPROCESSING)):
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return head(hidden[rows])
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return output_logits(out)[rows]


def resolve_device(device) -> torch.device:
    """Accept EasyEdit's ``device: 0`` as well as ``'cpu'``/``'cuda:1'``; fall back to CPU."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return torch.device(f"cuda:{int(device)}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return dev


EMBEDDED_PREFIX = "embedded"
QUICK_SUFFIX = "-quick"


def embedded_world(name: str):
    """The synthetic world an ``embedded...`` model name stands for (``...-quick``: the
    small world of ``rledit demo --quick``); the default world for any other name (the
    CLI's default data, whatever the model)."""
    from .world import WorldConfig, build_world
    return build_world(WorldConfig.quick() if name.endswith(QUICK_SUFFIX) else None)


def load_model_and_tokenizer(name: str, device="cpu", torch_dtype: str = "float32", cache_dir=None):
    """A causal LM and its tokenizer by hub name, local path, or ``embedded[-gpt2|-llama]``.

    ``embedded-tiny-gpt2`` / ``embedded-tiny-llama`` is the offline default: the
    synthetic world's tiny LM, pre-trained once and cached on disk; a ``-quick`` suffix
    (``embedded-tiny-gpt2-quick``) is the tiny LM of the small world of ``demo --quick``.
    """
    dtype = getattr(torch, torch_dtype)
    if name.startswith(EMBEDDED_PREFIX):
        from .world import load_or_train_tiny_lm
        from .world.tiny_lm import TinyLMConfig
        arch = "llama" if "llama" in name else "gpt2"
        config = TinyLMConfig.for_arch(arch, quick=name.endswith(QUICK_SUFFIX))
        model, tok, _ = load_or_train_tiny_lm(embedded_world(name), arch=arch, cache_dir=cache_dir,
                                              config=config)
    else:
        import transformers
        from packaging.version import Version
        tok = transformers.AutoTokenizer.from_pretrained(name)
        # `dtype` since transformers 4.56 (`torch_dtype` warns there); older releases know only torch_dtype
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        model = transformers.AutoModelForCausalLM.from_pretrained(name, **{key: dtype})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = model.to(device=resolve_device(device), dtype=dtype)
    model.eval()
    return model, tok
