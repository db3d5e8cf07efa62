"""Hyperparameters as small dataclasses loaded from EasyEdit-style YAML.

``RLEditHyperParams.from_hparams('hparams/RLEdit/tiny.yaml')`` reads the file,
turns scientific-notation strings into floats (PyYAML reads ``1e-4`` as a
string), and refuses unknown keys with the closest known name.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml


class HParamsError(ValueError):
    pass


def _to_number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _checked(key: str, value: Any, ftype: str, source: str) -> Any:
    """``value`` as the field's annotated type (float strings such as ``1e-4`` included), or an
    error naming the file and the key; YAML's own types are trusted no further than that."""
    def bad(what):
        return HParamsError(f"{source}: key '{key}' must be {what}, got {value!r}")
    if value is None:
        if ftype.startswith("Optional"):
            return None
        raise bad("set (not null)")
    base = ftype[len("Optional["):-1] if ftype.startswith("Optional[") else ftype
    if base == "float":
        number = _to_number(value) if not isinstance(value, bool) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise bad("a number")
        return float(number)
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise bad("an integer")
        return int(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base == "List[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return list(value)
    if base == "Union[int, str]":      # device: an index or a name
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("a device index or name")
        return value
    return value


@dataclass
class _YamlParams:
    """Base: from_hparams / from_json / from_dict / to_dict with strict keys."""

    @classmethod
    def from_dict(cls, config: Dict[str, Any], source: str = "<dict>"):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in config if k not in names]
        if unknown:
            key = unknown[0]
            near = difflib.get_close_matches(key, list(names), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise HParamsError(f"{source}: unknown key '{key}'{hint} for {cls.__name__}")
        kwargs = {key: _checked(key, value, str(names[key].type), source) for key, value in config.items()}
        obj = cls(**kwargs)
        obj.validate(source)
        return obj

    @classmethod
    def from_hparams(cls, path: Union[str, os.PathLike]):
        path = str(path)
        if not path.endswith((".yaml", ".yml")) and not os.path.exists(path):
            path = path + ".yaml"
        try:
            with open(path) as f:
                config = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise HParamsError(f"hparams file not found: {path}") from None
        except yaml.YAMLError as e:
            raise HParamsError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(config, dict):
            raise HParamsError(f"{path}: expected a mapping of keys to values")
        return cls.from_dict(config, source=path)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]):
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "<hparams>") -> None:
        pass


@dataclass
class RLEditHyperParams(_YamlParams):
    """Editing-time hyperparameters (what ``BaseEditor`` and ``rledit edit`` read)."""

    # EasyEdit fields
    alg_name: str = "RLEdit"
    model_name: str = ""
    device: Union[int, str] = "cpu"
    model_parallel: bool = False
    max_length: int = 64
    batch_size: int = 20
    # which weights change; empty = the family default (models.default_edit_modules)
    inner_params: List[str] = field(default_factory=list)
    # trained hypernetwork (safetensors + JSON directory); None = untrained
    archive: Optional[str] = None
    # hypernetwork architecture
    rank: int = 1024
    n_blocks: int = 4
    init_lr: float = 1e-6
    init_lam: float = 0.0
    norm_eps: float = 1e-5
    # normaliser keeps updating at test time ("lifelong normalisation")
    lifelong_norm: bool = True
    # records per forward/backward when capturing keys and value-gradients
    edit_minibatch: int = 20
    # capture -> predict -> apply rounds per edit batch; each later round captures on the
    # weights the earlier ones changed (core/editor.py); 1 = the paper
    edit_steps: int = 1
    # later rounds skip the forward before the first edited module (same numbers; core/prefix.py)
    reuse_prefix: bool = True
    # weight update: kernel path and bf16/fp16 compensation ("none" | "fp32" | "kahan")
    kernel_path: str = "auto"
    accumulate: str = "none"
    torch_dtype: str = "float32"
    seed: int = 0
    # ridge penalty shaped by the key second moment (core/whitening.py); off = the paper's ridge
    key_whitening: bool = False
    whitening_damping: float = 0.01
    whitening_texts: Optional[str] = None   # text file, one per line; default: the training records
    # > 0: the key statistics also weigh the positions that predict an answer (the training
    # records' prompts, and the pre-training statements of the embedded tiny LM) at this
    # share of the all-token moment's trace; docs/TUNING.md section 14
    whitening_answer_weight: float = 0.0
    # torch threads that measure the key statistics (> 0: exactly that many, restored after;
    # 0: the caller's setting); editing and training keep theirs (docs/TUNING.md section 16)
    statistics_threads: int = 0
    # > 0: the ridge also penalises changes along the keys of batches already applied, each
    # key weighted by this much (relative to one token of the key statistics with whitening,
    # to the identity without); core/memory.py
    edit_memory: float = 0.0
    # an answer token whose probability is already >= this gets no value change (D row 0):
    # the update keeps that row's output as it is; None = every row is pushed (the paper)
    settled_prob: Optional[float] = None

    def validate(self, source: str = "<hparams>") -> None:
        if self.alg_name.lower() != "rledit":
            raise HParamsError(f"{source}: alg_name must be 'RLEdit', got '{self.alg_name}'")
        self.alg_name = "RLEdit"   # EasyEdit's ALG_DICT is keyed by this exact spelling
        self.inner_params = [p[:-len(".weight")] if p.endswith(".weight") else p
                             for p in (self.inner_params or [])]
        twice = sorted({p for p in self.inner_params if self.inner_params.count(p) > 1})
        if twice:
            raise HParamsError(f"{source}: key 'inner_params' names {twice} more than once")
        for key in ("rank", "n_blocks", "max_length", "batch_size", "edit_minibatch", "edit_steps"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"{source}: key '{key}' must be >= 1")
        if float(self.init_lr) <= 0:
            raise HParamsError(f"{source}: key 'init_lr' must be > 0 (the initial edit step)")
        if not re.fullmatch(r"cpu|mps|auto|(cuda|xpu|npu)(:\d+)?|\d+", str(self.device)):
            raise HParamsError(f"{source}: key 'device' must be cpu, cuda, cuda:N, mps, auto or a GPU "
                               f"index, got {self.device!r}")
        if self.accumulate not in ("none", "fp32", "kahan"):
            raise HParamsError(f"{source}: key 'accumulate' must be none, fp32 or kahan")
        if self.kernel_path not in ("auto", "torch", "triton"):
            raise HParamsError(f"{source}: key 'kernel_path' must be auto, torch or triton")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise HParamsError(f"{source}: key 'torch_dtype' must be float32, bfloat16 or float16")
        if float(self.whitening_damping) <= 0:
            raise HParamsError(f"{source}: key 'whitening_damping' must be > 0")
        if float(self.whitening_answer_weight) < 0:
            raise HParamsError(f"{source}: key 'whitening_answer_weight' must be >= 0 (0 = off)")
        if float(self.edit_memory) < 0:
            raise HParamsError(f"{source}: key 'edit_memory' must be >= 0 (0 = off)")
        if int(self.statistics_threads) < 0:
            raise HParamsError(f"{source}: key 'statistics_threads' must be >= 0 (0 = the caller's)")
        if self.settled_prob is not None and not 0.0 < float(self.settled_prob) <= 1.0:
            raise HParamsError(f"{source}: key 'settled_prob' must be in (0, 1] or null")


@dataclass
class RLEditTrainingHyperParams(RLEditHyperParams):
    """Sequence-level hypernetwork training (rledit-algorithm.md section 5)."""

    train_data: Optional[str] = None
    val_data: Optional[str] = None
    results_dir: str = "results"
    n_edits: int = 20            # records per edit batch
    traj_len: int = 20           # T: edit batches per trajectory
    n_trajectories: int = 1
    steps_per_trajectory: int = 1  # optimiser steps; the reference takes 1 in total
    meta_lr: float = 1e-5
    loc_coef: float = 0.6
    loc_reference: str = "step"  # KL against "step": W_{t-1} (the paper); "initial": W_0 of the trajectory
    # "pristine": every trajectory edits W_0 (the paper); "continue": each starts where the
    # last one ended, so trajectory i trains on a model that already holds (i-1) x T x n edits
    trajectory_start: str = "pristine"
    reg_coef: float = 1e-4
    reg_mode: str = "paper"      # "paper": real gradient; "reference": inert as in the reference code
    time_decay: float = 0.95
    back_depth: int = 10
    max_grad_norm: float = 1.0
    loss_minibatch: int = 64     # prompts per forward/backward of the losses
    n_val: int = 100             # held-out records scored after each trajectory
    keep_best: bool = True

    def validate(self, source: str = "<hparams>") -> None:
        super().validate(source)
        if self.reg_mode not in ("paper", "reference"):
            raise HParamsError(f"{source}: key 'reg_mode' must be 'paper' or 'reference'")
        if self.loc_reference not in ("step", "initial"):
            raise HParamsError(f"{source}: key 'loc_reference' must be 'step' or 'initial'")
        if self.trajectory_start not in ("pristine", "continue"):
            raise HParamsError(f"{source}: key 'trajectory_start' must be 'pristine' or 'continue'")
        for key in ("n_edits", "traj_len", "steps_per_trajectory", "back_depth", "loss_minibatch"):
            if int(getattr(self, key)) < 1:
                raise HParamsError(f"{source}: key '{key}' must be >= 1")
        if int(self.n_trajectories) < 0:   # 0 = keep the untrained hypernetwork
            raise HParamsError(f"{source}: key 'n_trajectories' must be >= 0")
        if not 0.0 < self.time_decay <= 1.0:
            raise HParamsError(f"{source}: key 'time_decay' must be in (0, 1]")

    def editing(self) -> RLEditHyperParams:
        """The editing-time subset (what an archive records)."""
        names = {f.name for f in dataclasses.fields(RLEditHyperParams)}
        return RLEditHyperParams(**{k: v for k, v in self.to_dict().items() if k in names})
