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

Later rounds also reuse the attention mask: a Hugging Face model turns the 2-D padding
mask into the 4-D mask its attention layers read (2.2 ms per forward for the embedded
default's 20-row batch: most of a later round's capture there), and hands a 4-D mask it
is given to those layers as it is.  When the first forward passed exactly one 4-D tensor
as ``attention_mask`` to its modules, and the first module to receive it ran before any
edited one, later rounds pass that tensor to the model instead of the 2-D mask.  The first
receiver checks that it gets that very tensor; if not (a model that rewrites the mask it
is given), :class:`MaskRejected` stops the forward before any edited module ran and the
caller runs it again with the 2-D mask, which every later round then uses.
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


class MaskRejected(RuntimeError):
    """A later round's forward did not hand the recorded 4-D attention mask on unchanged."""


def _mask_kwarg(kwargs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 4 else None


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
        # x K^T per (minibatch, K): the head's input precedes every edit, so it repeats each round
        self._head_products: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        # the 4-D attention mask of each minibatch and the first module that receives it
        self._masks: Dict[int, torch.Tensor] = {}
        self._mask_reader: Optional[nn.Module] = None

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
        """Watch one forward: call order, call counts and outputs of every module, and the
        4-D attention masks modules receive."""
        counter = itertools.count()
        enter: Dict[nn.Module, List[int]] = {}
        leave: Dict[nn.Module, int] = {}
        outputs: Dict[nn.Module, Any] = {}
        masks: List[Tuple[nn.Module, torch.Tensor]] = []     # (receiver, 4-D attention mask)

        def pre(mod, args, kwargs):
            enter.setdefault(mod, []).append(next(counter))
            mask = _mask_kwarg(kwargs)
            if mask is not None:
                masks.append((mod, mask))

        def post(mod, args, out):
            leave[mod] = next(counter)
            outputs[mod] = (out, _versions(out))
        modules = [m for m in self.model.modules() if m is not self.model]
        hooked = {m for m in modules if m._forward_hooks or m._forward_pre_hooks}   # not ours: kept running
        handles = [h for m in modules for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
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
        # One mask for the whole forward (not, e.g., a sliding-window one beside a full one),
        # checked on its first receiver that later rounds still call (not inside a replayed
        # module), which must run before the forward reaches an edited weight.
        inside = {d for m in self.skip for d in m.modules() if d is not m}
        readers = [mod for mod, _ in masks if mod not in inside]
        if (len({id(mask) for _, mask in masks}) == 1 and readers
                and enter[readers[0]][0] < first):
            self._mask_reader = readers[0]
            self._masks[minibatch] = masks[0][1]
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
            self._drop_head()
        def grab_mask(mod, args, kwargs):
            mask = _mask_kwarg(kwargs)
            if mask is not None:
                self._masks[minibatch] = mask
        # prepend: the head's own output, before any hook of somebody else's rewrites it
        # (a replayed forward returns it, and their hooks run on it again)
        handles = [m.register_forward_hook(post, prepend=True) for m in self._recorded()]
        if self._mask_reader is not None:
            handles.append(self._mask_reader.register_forward_pre_hook(grab_mask, with_kwargs=True))
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
        self._drop_head()
        self._outputs.clear()
        self._versions.clear()
        self.drop_masks()

    def attention_mask(self, minibatch: int, mask: torch.Tensor) -> torch.Tensor:
        """What a later round passes as ``attention_mask``: the recorded 4-D mask, or ``mask``."""
        if self.enabled and minibatch in self._outputs and minibatch in self._masks:
            return self._masks[minibatch]
        return mask

    def drop_masks(self) -> None:
        """Pass the 2-D mask again from now on (after :class:`MaskRejected`)."""
        self._masks.clear()
        self._mask_reader = None

    @contextlib.contextmanager
    def _replay(self, minibatch: int) -> Iterator[None]:
        outputs = self._outputs[minibatch]
        replayed = self._recorded()
        saved = [m.__dict__.get("forward") for m in replayed]   # e.g. an accelerate wrapper
        for module, out in zip(self.skip, outputs):
            module.forward = lambda *args, __out=out, **kwargs: __out
        if self.head is not None:
            self.head.forward = lambda *args, __out=outputs[-1], **kwargs: self._corrected(
                __out, args[0] if args else next(iter(kwargs.values())), minibatch)
        handle = None
        if minibatch in self._masks:
            expected = self._masks[minibatch]

            def check_mask(mod, args, kwargs):
                if kwargs.get("attention_mask") is not expected:
                    raise MaskRejected("the model did not pass the recorded 4-D attention mask on")
            handle = self._mask_reader.register_forward_pre_hook(check_mask, with_kwargs=True)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            for module, forward in zip(replayed, saved):
                if forward is None:
                    del module.forward        # back to the class's forward
                else:
                    module.forward = forward
        if [_versions(o) for o in outputs] != self._versions[minibatch]:
            self._disable()               # changed in place downstream: later rounds run it all

    def _drop_head(self) -> None:
        self.head, self._head_updates, self._head_products = None, [], {}

    def _corrected(self, out: torch.Tensor, x: torch.Tensor, minibatch: int) -> torch.Tensor:
        """The head's output on its current weight: recorded output + x dW for each update.

        ``x K^T`` is computed once per minibatch and right factor: the head's input comes from
        the replayed prefix, the same every round, and each round adds the corrections of all
        earlier ones (rounds sharing ``K``, the memory's, already merged theirs)."""
        total = out
        for keys, coeffs in self._head_updates:
            seen = self._head_products.get((minibatch, id(keys)))
            if seen is None or seen[0] is not keys:
                seen = (keys, x.to(keys.dtype) @ keys.t())
                self._head_products[(minibatch, id(keys))] = seen
            total = total + (seen[1] @ coeffs).to(out.dtype)
        return total


def _detach(obj: Any) -> Any:
    # the capture makes the head's output a graph leaf; its recorded copy must not carry that
    return obj.detach() if isinstance(obj, torch.Tensor) else obj
