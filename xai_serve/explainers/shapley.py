"""Estimator maths of the sampling explainers: KernelSHAP's stratified design and the standard
errors of LIME's and KernelSHAP's surrogates. Device-resident and batched over images, in
float64; nothing here runs the model.

KernelSHAP as a stratified survey (:class:`StrataPlan`). The Shapley values of ``m`` players
solve the Shapley-kernel weighted least squares over all ``2^m`` coalitions under efficiency.
The coalitions of size ``k`` and ``m - k`` form one *stratum*; its *units* are the pairs
``(z, complement of z)`` (``paired``; for ``2k = m`` a pair holds two coalitions of size
``m / 2``) or single coalitions of size ``k`` (not paired; one stratum per size). A stratum of
``N`` units is sampled without replacement (a random permutation of its units, when
``N <= PERMUTE_LIMIT``; uniformly with replacement otherwise), ``n`` units so far, and every
sampled coalition gets the regression weight ``mu_k * N / n`` (``mu_k`` the Shapley kernel of
size ``k``), so that the weighted normal equations are unbiased for the exact ones and a
stratum whose ``N`` units are all drawn is enumerated exactly. Paired units make the estimate
exact for every game with interactions of order at most two (the pair-symmetrised game is then
additive). Units are given to the strata one at a time by a divisor method (Webster's:
the next unit goes to the stratum with the largest ``a_k / (n_k + 1/2)``, ``a_k`` the
stratum's *allocation weight*, after every stratum has :data:`MIN_UNITS`), a sequence that
depends only on ``m``: the first ``T`` units are the allocation for ``T`` units, whatever ``T``
is, so that a run cut short (a tolerance, a time budget) has the allocation of its size.

Standard errors (the sampling standard deviation of each weight around its infinite-sample
value) come from the linearisation (sandwich, influence function) of the estimating equations:

* KernelSHAP: ``phi_hat - phi ~ M sum_units w u``, ``u = sum_{z in unit} z e(z)`` with
  ``e(z)`` the residual of the fit and ``M`` the upper-left block of the inverse KKT matrix
  (``A^-1 - A^-1 1 1' A^-1 / 1' A^-1 1``: the constraint is exact and takes no variance). Its
  covariance is the stratified without-replacement variance
  ``sum_k (mu_k N_k)^2 (1 - n_k / N_k) / n_k * s_k^2`` with ``s_k^2`` the within-stratum
  sample covariance of ``u``; an enumerated stratum contributes 0 (``n_k = N_k``).
* KernelSHAP with output probabilities, regression-adjusted (a control variate): a
  logistic-additive surrogate ``g(z) = sigmoid(c + z . beta)`` is fitted to the drawn scores
  (:func:`logistic_surrogate`); its Shapley values are computed without the model
  (:func:`logistic_shapley`: enumerated up to 12 players, else 1024 antithetic permutations,
  whose variance is added), and the stratified estimate runs on the residual game ``v - g``,
  whose interactions are much smaller than ``v``'s where the softmax saturates. Efficiency
  holds exactly for both parts. An image takes it where its estimated variance is the lower.
* LIME: rows are i.i.d., so ``cov = B^-1 (sum_n (g_n - g_bar)(g_n - g_bar)' n / (n - 1)) B^-1``
  with ``B = X' W X + alpha diag(0, 1, ..)`` and ``g_n = w_n x_n e_n / (1 - h_n)`` (``h_n``
  the row's leverage: the HC3 correction of small samples); the fixed first row (the original
  image) is not random and takes no part.
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ALLOCATIONS",
    "MIN_UNITS",
    "PERMUTE_LIMIT",
    "StrataPlan",
    "antithetic_orders",
    "binomial_table",
    "efficient_wls",
    "kernelshap_stderr",
    "lime_stderr",
    "logistic_shapley",
    "logistic_surrogate",
    "unrank_subsets",
    "weighted_r2",
    "weighted_ridge",
]

MIN_UNITS = 2
"""Units every stratum gets before the others are allocated (2: a within-stratum variance)."""

PERMUTE_LIMIT = 1 << 16
"""Strata of at most this many units are sampled without replacement (a stored permutation of
their units); larger ones with replacement (their sampling fraction is then tiny)."""

ALLOCATIONS = ("kernel", "uniform", "sqrt")
"""Allocation weights of a stratum: its Shapley-kernel mass (KernelSHAP's sampling
distribution), the number of sizes it holds (uniform over sizes: the leverage scores of the
Shapley regression, Musco & Witter 2024), or the geometric mean of the two."""

SEQUENCE_LIMIT = 1 << 16
"""Units of the longest allocation sequence (far more than any request's samples)."""

_BINOM_CAP = 1 << 62
_SOLVE_JITTER = 1e-10  # relative ridge that keeps underdetermined normal equations solvable


# --------------------------------------------------------------------------- combinatorics


def binomial_table(m: int, device: torch.device) -> Tensor:
    """int64 ``Tensor[m + 1, m + 1]``: ``C(p, q)`` (0 for ``q > p``), capped at ``2^62``: the
    caps never matter to :func:`unrank_subsets` of a stratum with fewer units than that."""
    table = [[min(math.comb(p, q), _BINOM_CAP) for q in range(m + 1)] for p in range(m + 1)]
    return torch.tensor(table, dtype=torch.int64, device=device)


def unrank_subsets(ranks: Tensor, sizes: Tensor, m: int, binom: Tensor) -> Tensor:
    """bool ``Tensor[n, m]``: the ``sizes[j]``-subset of ``m`` players of rank ``ranks[j]`` in
    the combinatorial number system (``rank = sum_i C(c_i, i)`` over its members
    ``c_1 < c_2 < ...``), decoded greedily from the highest player down; one pass over the
    ``m`` players for all subsets at once."""
    out = torch.zeros(ranks.shape[0], m, dtype=torch.bool, device=ranks.device)
    r, k = ranks.clone(), sizes.clone()
    for p in range(m - 1, -1, -1):
        c = binom[p].gather(0, k)
        take = (k > 0) & (r >= c)
        out[:, p] = take
        r = r - torch.where(take, c, 0)
        k = k - take.to(k.dtype)
    return out


# --------------------------------------------------------------------------- the design


def _kernel_mass(m: int, k: int) -> float:
    """Shapley-kernel mass of one coalition of size ``k`` times the number of them:
    ``C(m, k) mu_k = (m - 1) / (k (m - k))``."""
    return (m - 1) / (k * (m - k))


@dataclass
class StrataPlan:
    """The strata of one image's ``m`` players and the units drawn from each so far.

    Attributes:
        m: players (the superpixel ids the image uses), ``m >= 2``.
        paired: units are (coalition, complement) pairs.
        sizes: ``k`` of each stratum (``1..m//2`` paired, ``1..m-1`` not).
        units: ``N_k``, the units of each stratum (Python ints, exact).
        mass: ``mu_k N_k``: ``mu_k`` the Shapley kernel of one coalition of the stratum.
        alloc: allocation weights ``a_k``.
        drawn: ``n_k``, units drawn so far.
    """

    m: int
    paired: bool
    allocation: str = "kernel"
    sizes: list[int] = field(init=False)
    units: list[int] = field(init=False)
    mass: list[float] = field(init=False)
    alloc: list[float] = field(init=False)
    drawn: list[int] = field(init=False)
    _perms: dict[int, Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        m = self.m
        if self.paired:
            self.sizes = list(range(1, m // 2 + 1))
            self.units = [
                math.comb(m, k) if 2 * k < m else math.comb(m, k) // 2 for k in self.sizes
            ]
            # a pair of two sizes k, m - k carries the mass of both; mass per member
            self.mass = [
                _kernel_mass(m, k) if 2 * k < m else _kernel_mass(m, k) / 2 for k in self.sizes
            ]
            span = [2.0 if 2 * k < m else 1.0 for k in self.sizes]
        else:
            self.sizes = list(range(1, m))
            self.units = [math.comb(m, k) for k in self.sizes]
            self.mass = [_kernel_mass(m, k) for k in self.sizes]
            span = [1.0] * len(self.sizes)
        kernel = [mass * self.members for mass in self.mass]  # mu_k x coalitions
        if self.allocation == "kernel":
            self.alloc = kernel
        elif self.allocation == "uniform":
            self.alloc = span
        elif self.allocation == "sqrt":
            self.alloc = [math.sqrt(a * s) for a, s in zip(kernel, span, strict=True)]
        else:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        self.drawn = [0] * len(self.sizes)

    @property
    def total_units(self) -> int:
        return sum(self.units)

    @property
    def drawn_units(self) -> int:
        return sum(self.drawn)

    @property
    def members(self) -> int:
        return 2 if self.paired else 1

    @property
    def exhausted(self) -> bool:
        """Every stratum enumerated: the estimate is the exact Shapley value."""
        return self.drawn_units >= self.total_units

    def min_units(self) -> int:
        """Units until every stratum holds :data:`MIN_UNITS` (or all of its units)."""
        return sum(min(MIN_UNITS, n) for n in self.units)

    def allocate(self, count: int) -> tuple[list[int], list[int]]:
        """The next ``count`` units (fewer if the strata run out): ``(units per stratum, units
        each stratum had before)``, continuing the divisor sequence; updates :attr:`drawn`."""
        before = list(self.drawn)
        sequence = _allocation_sequence(self.m, self.paired, self.allocation)
        done = sum(before)
        add = [0] * len(self.sizes)
        for j in sequence[done : done + count]:
            add[j] += 1
        self.drawn = [a + b for a, b in zip(before, add, strict=True)]
        return add, before

    def draw(
        self, add: list[int], start: list[int], generator: torch.Generator, binom: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Draws ``add[j]`` units of stratum ``j`` (its units ``start[j]..`` of the stored
        permutation, for small strata) from ``generator``: ``(first members
        Tensor[sum(add), m] bool, stratum index Tensor[sum(add)] int64)``."""
        device = binom.device
        m = self.m
        ranks, sizes, blocks, order = [], [], [], []
        for j, c in enumerate(add):
            if c == 0:
                continue
            k, cap = self.sizes[j], self.units[j]
            half = self.paired and 2 * k == m  # pairs of two halves: fix player m - 1 in z
            if cap <= PERMUTE_LIMIT:
                perm = self._perms.get(j)
                if perm is None:
                    perm = torch.randperm(cap, generator=generator, device=device)
                    self._perms[j] = perm
                ranks.append(perm[start[j] : start[j] + c])
                sizes.append(torch.full((c,), k - 1 if half else k, device=device))
                order.append((j, c, "rank", half))
            else:
                noise = torch.rand(c, m, generator=generator, device=device)
                idx = noise.topk(k, dim=1, largest=False).indices
                z = torch.zeros(c, m, dtype=torch.bool, device=device)
                blocks.append(z.scatter_(1, idx, True))
                order.append((j, c, "noise", False))
        decoded = None
        if ranks:
            decoded = unrank_subsets(torch.cat(ranks), torch.cat(sizes).to(torch.int64), m, binom)
        out, strata, at, bi = [], [], 0, 0
        for j, c, kind, half in order:
            if kind == "rank":
                assert decoded is not None
                z = decoded[at : at + c]
                at += c
                if half:
                    z = z.clone()
                    z[:, m - 1] = True
            else:
                z = blocks[bi]
                bi += 1
            out.append(z)
            strata.append(torch.full((c,), j, dtype=torch.int64, device=device))
        if not out:
            return (
                torch.zeros(0, m, dtype=torch.bool, device=device),
                torch.zeros(0, dtype=torch.int64, device=device),
            )
        return torch.cat(out), torch.cat(strata)

    def stratum_tables(self) -> tuple[list[float], list[float]]:
        """Per stratum: the regression weight of a drawn coalition, ``mu_k N_k / n_k`` (0 when
        none drawn), and the variance factor ``(mu_k N_k)^2 (1 - n_k / N_k) / (n_k (n_k - 1))``
        of its units (0 when enumerated or when fewer than 2 were drawn)."""
        weight, gamma = [], []
        for mass, cap, n in zip(self.mass, self.units, self.drawn, strict=True):
            weight.append(mass / n if n else 0.0)
            gamma.append(mass**2 * (1.0 - n / cap) / (n * (n - 1)) if 2 <= n < cap else 0.0)
        return weight, gamma

    def estimable(self) -> bool:
        """Whether every stratum that is not enumerated holds at least 2 units (the SEs are
        estimable)."""
        return all(
            n >= cap or n >= MIN_UNITS for n, cap in zip(self.drawn, self.units, strict=True)
        )


@functools.lru_cache(maxsize=256)
def _allocation_sequence(m: int, paired: bool, allocation: str) -> tuple[int, ...]:
    """The stratum of every unit in drawing order, until all strata are exhausted or
    :data:`SEQUENCE_LIMIT` units: first every stratum gets up to :data:`MIN_UNITS` units
    (round robin, the heavier strata first), then Webster's divisor method with the
    allocation weights (the next unit to the largest ``a_k / (n_k + 1/2)``)."""
    plan = StrataPlan(m, paired, allocation)
    caps, alloc = plan.units, plan.alloc
    n = [0] * len(caps)
    seq: list[int] = []
    by_weight = sorted(range(len(caps)), key=lambda j: -alloc[j])
    for level in range(MIN_UNITS):
        for j in by_weight:
            if n[j] < caps[j] and n[j] == level:
                seq.append(j)
                n[j] += 1
    heap = [(-alloc[j] / (n[j] + 0.5), j) for j in range(len(caps)) if n[j] < caps[j]]
    heapq.heapify(heap)
    while heap and len(seq) < SEQUENCE_LIMIT:
        _, j = heapq.heappop(heap)
        seq.append(j)
        n[j] += 1
        if n[j] < caps[j]:
            heapq.heappush(heap, (-alloc[j] / (n[j] + 0.5), j))
    return tuple(seq)


# --------------------------------------------------------------------------- solvers


def _mask_absent(a: Tensor, r: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """Replace the rows and columns of unused ids by the identity (their solution is 0)."""
    absent = ~present
    a = a.masked_fill(absent[:, :, None] | absent[:, None, :], 0.0)
    a = a + torch.diag_embed(absent.to(a.dtype))
    return a, r.masked_fill(absent, 0.0)


def _jitter(a: Tensor, present: Tensor) -> Tensor:
    """A ridge of ``_SOLVE_JITTER`` times the mean diagonal on the used ids, which keeps a
    normal matrix of too few (or collinear) samples invertible and moves a well-posed solution
    by a relative ~1e-10."""
    p = present.to(a.dtype)
    diag = torch.diagonal(a, dim1=1, dim2=2)
    scale = (diag * p).sum(1) / p.sum(1).clamp_min(1.0)
    scale = torch.where(scale > 0, scale, 1.0)
    return a + torch.diag_embed(_SOLVE_JITTER * scale[:, None] * p)


def weighted_r2(y: Tensor, pred: Tensor, w: Tensor) -> Tensor:
    """Weighted coefficient of determination per row, as sklearn's ``r2_score`` with
    ``sample_weight`` (a constant target gives 1 if predicted exactly, else 0)."""
    sw = w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    ybar = (w * y).sum(1, keepdim=True) / sw
    num = (w * (y - pred) ** 2).sum(1)
    den = (w * (y - ybar) ** 2).sum(1)
    safe = torch.where(den > 0, den, 1.0)
    return torch.where(den > 0, 1.0 - num / safe, torch.where(num > 0, 0.0, 1.0))


def efficient_wls(
    z: Tensor, y: Tensor, w: Tensor, f0: Tensor, f1: Tensor, present: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """KernelSHAP's constrained weighted least squares, batched over images.

    Minimises ``sum_n w[n] (y[n] - f0 - z[n] . phi)^2`` subject to
    ``sum(phi over used ids) = f1 - f0`` through the KKT system
    ``[[Z^T W Z, 1], [1^T, 0]] [phi; lam] = [Z^T W (y - f0); f1 - f0]`` (a Lagrange multiplier),
    so efficiency holds to the solver's precision. Unused ids get ``phi = 0``.

    ``z``: ``Tensor[B, N, S]``; ``y``, ``w``: ``Tensor[B, N]``; ``f0``, ``f1``: ``Tensor[B]``
    (float64). Returns ``(phi [B, S], M [B, S, S], weighted R^2 of f0 + z . phi [B])`` with
    ``M`` the upper-left block of the inverse KKT matrix (``d phi = M d(Z^T W (y - f0))``).
    """
    b, _, s = z.shape
    p = present.to(z.dtype)
    z = z * p[:, None, :]
    yp = y - f0[:, None]
    zw = z * w[:, :, None]
    a = zw.transpose(1, 2) @ z
    r = (zw.transpose(1, 2) @ yp[:, :, None]).squeeze(2)
    a, r = _mask_absent(a, r, present)
    a = _jitter(a, present)
    kkt = torch.zeros(b, s + 1, s + 1, dtype=z.dtype, device=z.device)
    kkt[:, :s, :s] = a
    kkt[:, :s, s] = p
    kkt[:, s, :s] = p
    kkt[:, s, s] = (p.sum(1) == 0).to(z.dtype)  # an image without players: keep it regular
    rhs = torch.cat([r, (f1 - f0)[:, None]], dim=1)
    eye = torch.eye(s + 1, dtype=z.dtype, device=z.device).expand(b, -1, -1)
    sol = torch.linalg.solve(kkt, torch.cat([rhs[:, :, None], eye], dim=2))
    phi = sol[:, :s, 0]
    m = sol[:, :s, 1 : s + 1] * (p[:, :, None] * p[:, None, :])
    pred = f0[:, None] + (z @ phi[:, :, None]).squeeze(2)
    return phi, m, weighted_r2(y, pred, w)


def kernelshap_stderr(
    units: Tensor, resid: Tensor, strata: Tensor, valid: Tensor, gamma: Tensor, m: Tensor
) -> Tensor:
    """Standard errors of the stratified KernelSHAP estimate, ``Tensor[B, S]`` float64.

    ``units``: ``Tensor[B, U, members, S]`` float64, the coalitions of every drawn unit;
    ``resid``: ``Tensor[B, U, members]`` their residuals ``y - f0 - z . phi``; ``strata``,
    ``valid``: ``Tensor[B, U]`` each unit's stratum and whether it is drawn (not padding);
    ``gamma``: ``Tensor[B, J]`` the strata's variance factors
    (:meth:`StrataPlan.stratum_tables`); ``m``: ``Tensor[B, S, S]`` from :func:`efficient_wls`.
    ``var(phi) = diag(M V M)``, ``V = sum_k gamma_k sum_{units of k} d d'``, ``d`` a unit's
    ``sum_members z e`` minus its stratum's mean.
    """
    b, u, _, s = units.shape
    j = gamma.shape[1]
    vmask = valid.to(units.dtype)
    t = (units * resid[..., None]).sum(2) * vmask[..., None]  # [B, U, S]
    index = strata[..., None].expand(b, u, s)
    sums = torch.zeros(b, j, s, dtype=t.dtype, device=t.device).scatter_add_(1, index, t)
    counts = torch.zeros(b, j, dtype=t.dtype, device=t.device).scatter_add_(1, strata, vmask)
    means = sums / counts.clamp_min(1.0)[..., None]
    d = (t - means.gather(1, index)) * vmask[..., None]
    g = d @ m  # [B, U, S]; M is symmetric
    weight = gamma.gather(1, strata) * vmask
    return ((weight[..., None] * g * g).sum(1)).clamp_min(0.0).sqrt()


def lime_stderr(
    z: Tensor,
    y: Tensor,
    w: Tensor,
    coef: Tensor,
    intercept: Tensor,
    alpha: float,
    present: Tensor,
    random: Tensor,
) -> Tensor:
    """Standard errors of LIME's ridge coefficients (HC3 sandwich), ``Tensor[B, S]`` float64.

    ``z``: ``Tensor[B, N, S]`` float64 coalitions, ``y``, ``w``: ``Tensor[B, N]``, ``coef``
    ``[B, S]`` and ``intercept`` ``[B]`` the fit; ``random``: ``Tensor[B, N]`` bool, the rows
    that were drawn (not the fixed first row, not padding). Unused ids get 0.
    """
    p = present.to(z.dtype)
    x = torch.cat([torch.ones_like(z[:, :, :1]), z * p[:, None, :]], dim=2)  # [B, N, S + 1]
    xw = x * w[:, :, None]
    bread = xw.transpose(1, 2) @ x
    pen = torch.cat([torch.zeros_like(p[:, :1]), p * alpha], dim=1)
    keep = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)
    bread = bread + torch.diag_embed(pen)
    bread, _ = _mask_absent(bread, pen, keep)
    bread = _jitter(bread, keep)
    binv = torch.linalg.inv(bread)
    resid = y - intercept[:, None] - (z * p[:, None, :] @ coef[:, :, None]).squeeze(2)
    lever = ((x @ binv) * xw).sum(2)  # h_n = w_n x_n' B^-1 x_n
    rmask = random.to(z.dtype)
    scale = (rmask / (1.0 - lever).clamp_min(1e-3))[..., None]
    g = xw * resid[..., None] * scale  # [B, N, S + 1]
    count = rmask.sum(1)
    gbar = g.sum(1, keepdim=True) / count.clamp_min(1.0)[:, None, None]
    d = (g - gbar) * rmask[..., None]
    h = d @ binv
    var = (h * h).sum(1) * (count / (count - 1.0).clamp_min(1.0))[:, None]
    return var[:, 1:].clamp_min(0.0).sqrt() * p


def weighted_ridge(
    z: Tensor, y: Tensor, w: Tensor, alpha: float, present: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted ridge regression with an unpenalised intercept, batched over images.

    ``z``: ``Tensor[B, N, S]``, ``y``, ``w``: ``Tensor[B, N]`` (float64); ``present``:
    ``Tensor[B, S]`` bool (unused ids get coefficient 0). As sklearn's
    ``Ridge(alpha).fit(z, y, sample_weight=w)``: centre ``z`` and ``y`` by their weighted means,
    solve ``(Zc^T W Zc + alpha I) b = Zc^T W yc``, intercept ``ybar - zbar . b``. Rows of weight
    0 take no part.

    Returns ``(coef [B, S], intercept [B], weighted R^2 on the same data [B])``, float64.
    """
    z = z * present[:, None, :].to(z.dtype)
    sw = w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    zbar = (w[:, :, None] * z).sum(1) / sw  # [B, S]
    ybar = (w * y).sum(1, keepdim=True) / sw  # [B, 1]
    zc, yc = z - zbar[:, None, :], y - ybar
    zw = zc * w[:, :, None]
    a = zw.transpose(1, 2) @ zc
    r = (zw.transpose(1, 2) @ yc[:, :, None]).squeeze(2)
    a = a + alpha * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    a, r = _mask_absent(a, r, present)
    if alpha == 0:
        a = _jitter(a, present)
    coef = torch.linalg.solve(a, r)
    intercept = ybar.squeeze(1) - (zbar * coef).sum(1)
    pred = intercept[:, None] + (z @ coef[:, :, None]).squeeze(2)
    return coef, intercept, weighted_r2(y, pred, w)


# --------------------------------------------------------------------------- control variate

SURROGATE_EXACT_PLAYERS = 12
"""The surrogate's Shapley values are enumerated exactly up to this many players."""

SURROGATE_PERMUTATIONS = 512
"""Antithetic permutation pairs that estimate the surrogate's Shapley values beyond that."""

_LOGIT_CLAMP = 1e-6


def logistic_surrogate(
    z: Tensor, y: Tensor, w: Tensor, f0: Tensor, f1: Tensor, present: Tensor, iters: int = 3
) -> Tensor:
    """A logistic-additive game ``g(z) = sigmoid(c + z . beta)`` fitted to the scores ``y``
    (probabilities) of the coalitions ``z`` with weights ``w``, the full and the empty
    coalition weighted as all rows together: a weighted least squares in logit space (rows
    weighted by ``(p (1 - p))^2``, the delta method), then ``iters`` Gauss-Newton steps of
    the weighted least squares in probability space. Batched; float64
    ``Tensor[B, S + 1]`` = ``(c, beta)`` (``beta`` 0 on unused ids)."""
    b = z.shape[0]
    p = present.to(z.dtype)
    ends = torch.stack([p, torch.zeros_like(p)], dim=1)  # [B, 2, S]
    zz = torch.cat([z * p[:, None, :], ends], dim=1)
    yy = torch.cat([y, torch.stack([f1, f0], dim=1)], dim=1)
    total = w.sum(1, keepdim=True).clamp_min(1e-300)
    ww = torch.cat([w, total.expand(b, 2)], dim=1)
    x = torch.cat([torch.ones_like(zz[:, :, :1]), zz], dim=2)
    keep = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)
    yc = yy.clamp(_LOGIT_CLAMP, 1.0 - _LOGIT_CLAMP)

    def solve(jac: Tensor, weights: Tensor, target: Tensor) -> Tensor:
        jw = jac * weights[:, :, None]
        a = jw.transpose(1, 2) @ jac
        r = (jw.transpose(1, 2) @ target[:, :, None]).squeeze(2)
        a, r = _mask_absent(a, r, keep)
        a = a + torch.diag_embed(1e-8 * torch.diagonal(a, dim1=1, dim2=2).mean(1, True) * keep)
        return torch.linalg.solve(a, r)

    theta = solve(x, ww * (yc * (1.0 - yc)) ** 2, torch.logit(yc))
    for _ in range(iters):
        q = torch.sigmoid((x @ theta[:, :, None]).squeeze(2))
        step = solve(x * (q * (1.0 - q))[:, :, None], ww, yy - q)
        theta = theta + step
    return torch.where(torch.isfinite(theta), theta, 0.0) * keep


def _exact_logistic_shapley(c: Tensor, beta: Tensor) -> Tensor:
    """Exact Shapley values ``[B, n]`` of ``sigmoid(c + z . beta)`` over ``n`` players, by
    enumerating the ``2^n`` coalitions."""
    b, n = beta.shape
    device, dtype = beta.device, beta.dtype
    codes = torch.arange(1 << n, device=device)
    bits = (codes[:, None] >> torch.arange(n, device=device)) & 1  # [2^n, n]
    g = torch.sigmoid(c[:, None] + beta @ bits.to(dtype).T)  # [B, 2^n]
    size = bits.sum(1)
    coeff = torch.tensor(
        [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
        + [0.0],
        dtype=dtype,
        device=device,
    )[size]
    phi = torch.empty(b, n, dtype=dtype, device=device)
    for i in range(n):  # players, not samples
        without = codes[(codes >> i) & 1 == 0]
        gain = g[:, without | (1 << i)] - g[:, without]
        phi[:, i] = (gain * coeff[without]).sum(1)
    return phi


def logistic_shapley(
    theta: Tensor, counts: list[int], ids: Tensor, perms: list[Tensor | None]
) -> tuple[Tensor, Tensor]:
    """Shapley values of the logistic surrogates ``theta`` (``[B, S + 1]``) and the variance of
    their estimate, both ``[B, S]`` float64. An image of ``m <= SURROGATE_EXACT_PLAYERS``
    players is enumerated exactly (variance 0); a larger one averages the marginal
    contributions along ``perms[i]`` (``Tensor[P, m]`` orders of its players, antithetic
    pairs adjacent), whose contributions sum to ``g(1) - g(0)`` exactly in every order."""
    b, s1 = theta.shape
    s = s1 - 1
    device, dtype = theta.device, theta.dtype
    phi = torch.zeros(b, s, dtype=dtype, device=device)
    var = torch.zeros(b, s, dtype=dtype, device=device)
    width = max([*counts, 1])
    beta = theta[:, 1:].gather(1, ids[:, :width])  # players of each image, then unused ids
    small = [i for i, m in enumerate(counts) if m <= SURROGATE_EXACT_PLAYERS]
    large = [i for i, m in enumerate(counts) if m > SURROGATE_EXACT_PLAYERS]
    if small:
        n = max(counts[i] for i in small)
        idx = torch.tensor(small, device=device)
        # players beyond an image's own are dummies (beta 0): their value is 0, the others'
        # unchanged
        exact = _exact_logistic_shapley(theta[idx, 0], beta[idx, :n])
        phi[idx] = phi[idx].scatter(1, ids[idx, :n], exact)
    if large:
        n = max(counts[i] for i in large)
        idx = torch.tensor(large, device=device)
        orders = []
        for i in large:  # pad with the dummy players, last in every order
            own = perms[i]
            assert own is not None
            pad = torch.arange(counts[i], n, device=device).expand(own.shape[0], -1)
            orders.append(torch.cat([own, pad], dim=1))
        order = torch.stack(orders)  # [L, P, n]
        bl = beta[idx, :n]
        steps = bl[:, None, :].expand(-1, order.shape[1], -1).gather(2, order)
        after = theta[idx, 0][:, None, None] + steps.cumsum(2)
        contrib = torch.sigmoid(after) - torch.sigmoid(after - steps)
        per_player = torch.zeros_like(contrib).scatter_(2, order, contrib)  # [L, P, n]
        pairs = per_player.view(per_player.shape[0], -1, 2, n).mean(2)  # antithetic units
        mean = pairs.mean(1)
        v = pairs.var(1) / pairs.shape[1]
        phi[idx] = phi[idx].scatter(1, ids[idx, :n], mean)
        var[idx] = var[idx].scatter(1, ids[idx, :n], v)
    return phi, var


def antithetic_orders(m: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``Tensor[2 P, m]`` int64: :data:`SURROGATE_PERMUTATIONS` random orders of ``m`` players
    from ``generator``, each followed by its reverse."""
    noise = torch.rand(SURROGATE_PERMUTATIONS, m, generator=generator, device=device)
    order = noise.argsort(dim=1)
    return torch.stack([order, order.flip(1)], dim=1).reshape(-1, m)
