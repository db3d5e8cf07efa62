"""The hypernetwork: (keys, value-gradients) of one edited module -> value changes D.

MALMEN-style, one network per *shape group* (all edited modules with the same
(d_in, d_out) share it); the module identity m enters through per-module scale /
shift embeddings, a per-module normaliser and per-module scalars lr[m], lam[m].
For each row x = [k ; g] (width d_in + d_out):

    z  = (x - mean_m) / (std_m + eps)                     running normaliser of module m
    z <- z + scale_m * relu(z A B + b) + shift_m          n_blocks residual low-rank blocks
    k~, g~ = z[:d_in], z[d_in:]
    d  = -lr[m] * <k, k~> * g~                            value change (raw key k)

The ridge solve (core/solve.py) turns the rows d (stacked: D, N x d_out) into a
weight change using lam[m]. Every block is the identity at init, so an untrained
network edits with normalised gradients scaled by -lr <k, k_norm>.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RunningNorm(nn.Module):
    """Running per-feature mean / std over every row ever seen.

    Statistics are float64 buffers (count, mean, m2 = sum of squared deviations), so
    they are saved by state_dict and stay accurate over a long stream. Batches are
    merged with Chan et al.'s parallel formula. With fewer than two rows seen the
    std is taken as 1 (no NaN on one-row batches). The owner calls `update` before
    `forward` whenever it wants the statistics to move, at test time included.
    """

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.width, self.eps = width, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(width, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge a batch of rows (n, width) into the statistics."""
        if x.dim() != 2 or x.shape[1] != self.width:
            raise ValueError(f"RunningNorm expects rows of width {self.width}, got shape {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        x = x.detach().to(torch.float64)
        batch_mean = x.mean(0)
        batch_m2 = (x - batch_mean).pow(2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count.copy_(total)

    @property
    def var(self) -> Tensor:
        """Unbiased variance; ones while fewer than two rows have been seen."""
        # torch.where rather than an `if`: no host sync on GPU
        return torch.where(self.count >= 2, self.m2 / (self.count - 1).clamp(min=1), torch.ones_like(self.m2))

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def forward(self, x: Tensor) -> Tensor:
        # Centre only once two rows were seen: a lone row minus its own mean is zero,
        # which would make the very first one-token edit a silent no-op.
        mean = torch.where(self.count >= 2, self.mean, torch.zeros_like(self.mean)).to(x.dtype)
        std = self.std.to(x.dtype)
        return (x - mean) / (std + self.eps)


class HyperBlock(nn.Module):
    """z <- z + scale[m] * relu(z A B + b) + shift[m]; the identity at init (B = 0, b = 0).

    A ~ N(0, 1/D): z is normalised (unit variance per feature), so each entry of z A
    then has unit variance whatever the width D (an N(0, 1) init would make them
    ~sqrt(D), i.e. ~136 for Llama gate_proj rows of width 18432).
    The relu is `clamp(min=0)`, whose derivative at exactly 0 is 1 (torch.relu's is
    0). At init the pre-activation z A B + b is exactly 0; with torch.relu's
    derivative B and b would receive zero gradient, and so would A (its gradient is
    proportional to B): the blocks could never leave the identity.
    """

    def __init__(self, width: int, rank: int, n_modules: int, a_std: float | None = None):
        super().__init__()
        a_std = 1.0 / math.sqrt(width) if a_std is None else a_std
        self.A = nn.Parameter(torch.randn(width, rank) * a_std)
        self.B = nn.Parameter(torch.zeros(rank, width))
        self.b = nn.Parameter(torch.zeros(width))
        self.scale = nn.Embedding(n_modules, width)
        self.shift = nn.Embedding(n_modules, width)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, z: Tensor, m: int) -> Tensor:
        hidden = (z @ self.A @ self.B + self.b).clamp(min=0)
        return z + self.scale.weight[m] * hidden + self.shift.weight[m]


class ShapeGroupNet(nn.Module):
    """The hypernetwork shared by the n_modules edited modules of one (d_in, d_out) shape."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_modules: int,
        rank: int = 1024,
        n_blocks: int = 4,
        init_lr: float = 1e-6,
        init_lam: float = 0.0,
        eps: float = 1e-5,
        a_std: float | None = None,
    ):
        super().__init__()
        if min(d_in, d_out, n_modules, rank) < 1 or n_blocks < 0:
            raise ValueError(
                f"bad ShapeGroupNet sizes: d_in={d_in} d_out={d_out} n_modules={n_modules} "
                f"rank={rank} n_blocks={n_blocks}"
            )
        self.d_in, self.d_out, self.n_modules = d_in, d_out, n_modules
        width = d_in + d_out
        self.norms = nn.ModuleList(RunningNorm(width, eps) for _ in range(n_modules))
        self.blocks = nn.ModuleList(HyperBlock(width, rank, n_modules, a_std) for _ in range(n_blocks))
        self.lr = nn.Parameter(torch.full((n_modules,), float(init_lr)))
        self.lam = nn.Parameter(torch.full((n_modules,), float(init_lam)))
        # Optional key whitening S (n_modules, d_in, d_in), see core/whitening.py; a buffer so
        # that archives, .to() and deepcopy carry it.  None = the paper's plain ridge.
        self.register_buffer("whiten", None)

    def _rows(self, keys: Tensor, grads: Tensor) -> Tensor:
        if keys.dim() != 2 or grads.dim() != 2 or keys.shape[1] != self.d_in or grads.shape[1] != self.d_out:
            raise ValueError(
                f"expected keys (N, {self.d_in}) and grads (N, {self.d_out}), "
                f"got {tuple(keys.shape)} and {tuple(grads.shape)}"
            )
        if keys.shape[0] != grads.shape[0]:
            raise ValueError(f"keys have {keys.shape[0]} rows but grads have {grads.shape[0]}")
        dtype = self.lr.dtype
        return torch.cat([keys.to(dtype), grads.to(dtype)], dim=1)

    def update_norm(self, keys: Tensor, grads: Tensor, m: int) -> None:
        self.norms[m].update(self._rows(keys, grads))

    def transform(self, keys: Tensor, grads: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Pseudo-keys k~ (N, d_in) and pseudo-gradients g~ (N, d_out) for module m."""
        z = self.norms[m](self._rows(keys, grads))
        for block in self.blocks:
            z = block(z, m)
        return z[:, : self.d_in], z[:, self.d_in :]

    def forward(self, keys: Tensor, grads: Tensor, m: int) -> Tensor:
        """Value changes D (N, d_out): D_i = -lr[m] * <k_i, k~_i> * g~_i."""
        pseudo_keys, pseudo_grads = self.transform(keys, grads, m)
        overlap = (keys.to(pseudo_keys.dtype) * pseudo_keys).sum(dim=1, keepdim=True)
        return -self.lr[m] * overlap * pseudo_grads


def shape_key(d_in: int, d_out: int) -> str:
    return f"{d_in}x{d_out}"


class HyperNetwork(nn.Module):
    """All shape groups of one edit setup, addressed by edited-module name.

    module_shapes: {module name: (d_in, d_out)}. Names are sorted; each shape gets one
    ShapeGroupNet (key "d_inxd_out") and each module its index within its group in
    sorted-name order, so the mapping depends only on the set of names and shapes.
    """

    def __init__(
        self,
        module_shapes: dict[str, tuple[int, int]],
        rank: int = 1024,
        n_blocks: int = 4,
        init_lr: float = 1e-6,
        init_lam: float = 0.0,
        eps: float = 1e-5,
        a_std: float | None = None,
    ):
        super().__init__()
        if not module_shapes:
            raise ValueError("HyperNetwork needs at least one edited module")
        self._shapes = {name: (int(module_shapes[name][0]), int(module_shapes[name][1]))
                        for name in sorted(module_shapes)}
        self._where: dict[str, tuple[str, int]] = {}
        members: dict[tuple[int, int], list[str]] = {}
        for name, shape in self._shapes.items():
            members.setdefault(shape, []).append(name)
        self.groups = nn.ModuleDict()
        for (d_in, d_out) in sorted(members):  # fixed construction order -> seeded init is reproducible
            key = shape_key(d_in, d_out)
            for index, name in enumerate(members[(d_in, d_out)]):
                self._where[name] = (key, index)
            self.groups[key] = ShapeGroupNet(d_in, d_out, len(members[(d_in, d_out)]), rank, n_blocks,
                                             init_lr, init_lam, eps, a_std)

    @property
    def module_names(self) -> list[str]:
        return list(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def locate(self, name: str) -> tuple[str, int]:
        """(group key, index within the group) of an edited module."""
        if name not in self._where:
            raise KeyError(f"module {name!r} is not edited by this hypernetwork (known: {self.module_names})")
        return self._where[name]

    def _group(self, name: str) -> tuple[ShapeGroupNet, int]:
        key, index = self.locate(name)
        return self.groups[key], index

    def update_norm(self, name: str, keys: Tensor, grads: Tensor) -> None:
        group, index = self._group(name)
        group.update_norm(keys, grads, index)

    def values(self, name: str, keys: Tensor, grads: Tensor) -> Tensor:
        """Value changes D (N, d_out) for module `name` (does not update the normaliser)."""
        group, index = self._group(name)
        return group(keys, grads, index)

    def lam(self, name: str) -> Tensor:
        """log-ridge of module `name` (0-d view of the group's leaf parameter `lam`)."""
        group, index = self._group(name)
        return group.lam[index]

    def lr(self, name: str) -> Tensor:
        group, index = self._group(name)
        return group.lr[index]

    # -- key whitening (core/whitening.py) -------------------------------
    @property
    def whitened(self) -> bool:
        return any(g.whiten is not None for g in self.groups.values())

    def enable_whitening(self) -> None:
        """Create identity whitening buffers (then load or :meth:`set_whitening` them)."""
        for g in self.groups.values():
            if g.whiten is None:
                g.whiten = torch.eye(g.d_in, device=g.lr.device).expand(g.n_modules, -1, -1).clone()

    def set_whitening(self, matrices: dict[str, Tensor]) -> None:
        """Whitening matrix S (d_in, d_in) per module name; every edited module needs one."""
        missing = sorted(set(self._shapes) - set(matrices))
        if missing:
            raise ValueError(f"no whitening matrix for {missing}")
        self.enable_whitening()
        with torch.no_grad():
            for name, s in matrices.items():
                group, index = self._group(name)
                if tuple(s.shape) != (group.d_in, group.d_in):
                    raise ValueError(f"whitening matrix for {name!r} must be ({group.d_in}, {group.d_in}), "
                                     f"got {tuple(s.shape)}")
                group.whiten[index].copy_(s)

    def whitening(self, name: str) -> Tensor | None:
        """S for module ``name``, or None when the plain ridge is used."""
        group, index = self._group(name)
        return None if group.whiten is None else group.whiten[index]
