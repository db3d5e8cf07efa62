"""Reuse of the forward prefix between edit rounds of one batch.

With ``edit_steps > 1`` a batch is captured again on weights that only the
edited modules changed.  Everything the forward computes *before* the first
edited module runs is therefore the same in every round: the embeddings, every
earlier layer, and in the first edited layer whatever precedes that module
(attention, the MLP input projection, ...).  The first round records the
outputs of those modules; later rounds short-circuit them (their ``forward``
returns the recorded output) and compute only from the first edited module on.
The numbers are the same bit for bit; only the time differs.

Which modules qualify is found by watching one forward, so no architecture is
special-cased: a module qualifies when it is called exactly once, returns
before the forward first enters a module holding an edited weight (an edited
module, or one tied to it such as the input embedding of an edited head), and
has no forward hooks of somebody else's in it (they must keep seeing every
forward).  Only the outermost such modules are short-circuited.  A model that
reads an edited weight from outside the module owning it, before that module
runs, would defeat this; ``reuse_prefix: false`` turns it off.  Recorded tensors
are checked with their version counters: if the model modifies one in place
later in the forward, reuse is switched off for the rest of the batch and every
round runs the whole model.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..models import is_conv1d


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def _versions(obj: Any) -> List[int]:
    return [t._version for t in _tensors(obj)]


class ForwardPrefix:
    """Outputs of the modules that run before the first edited module, per minibatch."""

    def __init__(self, model: nn.Module, edited: Mapping[str, nn.Module], low_rank_head: bool = False):
        self.model = model
        self.edited = list(edited.values())
        self.enabled = True
        self.skip: Optional[List[nn.Module]] = None   # the outermost qualifying modules
        self._outputs: Dict[int, List[Any]] = {}       # minibatch -> their recorded outputs
        self._versions: Dict[int, List[List[int]]] = {}
        # the first edited module, replayed as recorded output + low-rank corrections
        self.head: Optional[nn.Module] = None
        self._low_rank_head = low_rank_head
        self._head_updates: List[Tuple[torch.Tensor, torch.Tensor]] = []   # (K, C) since recording

    @contextlib.contextmanager
    def around(self, minibatch: int) -> Iterator[None]:
        """Wrap the forward of ``minibatch``: record it the first time, replay it after."""
        if not self.enabled:
            yield
        elif minibatch in self._outputs:
            with self._replay(minibatch):
                yield
        elif self.skip is None:
            with self._discover(minibatch):
                yield
        else:
            with self._record(minibatch):
                yield

    @contextlib.contextmanager
    def _discover(self, minibatch: int) -> Iterator[None]:
        """Watch one forward: call order, call counts and outputs of every module."""
        counter = itertools.count()
        enter: Dict[nn.Module, List[int]] = {}
        leave: Dict[nn.Module, int] = {}
        outputs: Dict[nn.Module, Any] = {}

        def pre(mod, args):
            enter.setdefault(mod, []).append(next(counter))

        def post(mod, args, out):
            leave[mod] = next(counter)
            outputs[mod] = (out, _versions(out))
        modules = [m for m in self.model.modules() if m is not self.model]
        hooked = {m for m in modules if m._forward_hooks or m._forward_pre_hooks}   # not ours: kept running
        handles = [h for m in modules for h in (m.register_forward_pre_hook(pre),
                                                m.register_forward_hook(post, prepend=True))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        edited_weights = {p.data_ptr() for m in self.edited for p in m.parameters()}
        # where the forward first touches an edited weight: an edited module, or one sharing
        # its weight (the tied input embedding of an edited output head)
        starts = [enter[m][0] for m in modules if m in enter and (m in self.edited or any(
            p.data_ptr() in edited_weights for p in m.parameters(recurse=False)))]
        if not starts:                    # edited modules never ran: nothing to reuse
            self.enabled = False
            return
        first = min(starts)
        qualifies = {m for m in modules
                     if len(enter.get(m, ())) == 1 and leave[m] < first
                     and not any(p.data_ptr() in edited_weights for p in m.parameters())
                     and not any(sub in hooked for sub in m.modules())}
        parents = {c: p for p in modules for c in p.children()}
        self.skip = sorted((m for m in qualifies if parents.get(m) not in qualifies),
                           key=lambda m: enter[m][0])
        head = next(m for m in modules if m in enter and enter[m][0] == first)
        if (self._low_rank_head and head in self.edited and len(enter[head]) == 1
                and (type(head) is nn.Linear or is_conv1d(head))):
            self.head = head
        self._keep(minibatch, [outputs[m] for m in self._recorded()])

    def _recorded(self) -> List[nn.Module]:
        return self.skip + ([self.head] if self.head is not None else [])

    def applied(self, module: nn.Module, keys: torch.Tensor, coeffs: torch.Tensor) -> None:
        """The editor added ``keys^T @ coeffs`` to ``module``'s weight (d_in x d_out view)."""
        if module is not self.head:
            return
        if self._head_updates and self._head_updates[-1][0] is keys:   # rounds sharing K (P or S
            self._head_updates[-1] = (keys, self._head_updates[-1][1] + coeffs)  # fixed): one x K^T
        else:
            self._head_updates.append((keys, coeffs))

    @contextlib.contextmanager
    def _record(self, minibatch: int) -> Iterator[None]:
        outputs: Dict[nn.Module, Any] = {}

        def post(mod, args, out):
            outputs[mod] = (out, _versions(out))
        if self._head_updates:      # minibatches recorded in a later round: no head shortcut
            self.head, self._head_updates = None, []
        # prepend: the head's own output, before any hook of somebody else's rewrites it
        # (a replayed forward returns it, and their hooks run on it again)
        handles = [m.register_forward_hook(post, prepend=True) for m in self._recorded()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._keep(minibatch, [outputs[m] for m in self._recorded()])

    def _keep(self, minibatch: int, recorded: List[Any]) -> None:
        """Keep one minibatch's outputs unless the forward changed one in place after it returned."""
        if any(_versions(out) != versions for out, versions in recorded):
            self._disable()
        else:
            self._outputs[minibatch] = [_detach(out) for out, _ in recorded]
            self._versions[minibatch] = [versions for _, versions in recorded]

    def _disable(self) -> None:
        self.enabled = False
        self.head, self._head_updates = None, []
        self._outputs.clear()
        self._versions.clear()

    @contextlib.contextmanager
    def _replay(self, minibatch: int) -> Iterator[None]:
        outputs = self._outputs[minibatch]
        replayed = self._recorded()
        saved = [m.__dict__.get("forward") for m in replayed]   # e.g. an accelerate wrapper
        for module, out in zip(self.skip, outputs):
            module.forward = lambda *args, __out=out, **kwargs: __out
        if self.head is not None:
            self.head.forward = lambda *args, __out=outputs[-1], **kwargs: self._corrected(
                __out, args[0] if args else next(iter(kwargs.values())))
        try:
            yield
        finally:
            for module, forward in zip(replayed, saved):
                if forward is None:
                    del module.forward        # back to the class's forward
                else:
                    module.forward = forward
        if [_versions(o) for o in outputs] != self._versions[minibatch]:
            self._disable()               # changed in place downstream: later rounds run it all

    def _corrected(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The head's output on its current weight: recorded output + x dW for each update."""
        total = out
        for keys, coeffs in self._head_updates:
            total = total + ((x.to(keys.dtype) @ keys.t()) @ coeffs).to(out.dtype)
        return total


def _detach(obj: Any) -> Any:
    # the capture makes the head's output a graph leaf; its recorded copy must not carry that
    return obj.detach() if isinstance(obj, torch.Tensor) else obj
