"""The fine-grained MoE scaling law: its coefficients, a fitter, and the compute-optimal N, D, G for a budget.

Krajewski, Ludziejewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts" (arXiv 2402.07871;
ICML 2024), eq. 9 and Table 1:

    L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta          (dense, eq. 1: no g term)

N = total non-embedding parameters (attention plus every expert), D = training tokens, G = d_ff / d_expert.

How the paper fits it (section 5.3): "Similarly to Hoffmann et al. (2022), we use Huber loss with delta = 0.1.
The optimization is performed using the BFGS algorithm. We include a weight decay of 5e-4". The text does not
say whether the residual is taken on L or on log L. Chinchilla (Hoffmann et al., appendix D.2) fits log L with
a log-sum-exp form and delta = 1e-3; this paper's delta is 100 times larger and its reported fit error
(RMSE 0.015, validation RMSE 0.019) is in loss units, which indicates residuals on L itself: a delta of 0.1
on log L would make the Huber loss plain least squares for every run it reports. So we take the residual on L,
prediction minus observation, with delta 0.1 and BFGS. We keep Chinchilla's parameterisation of the
coefficients (their logarithms are optimised, so a, b, g, c stay positive), and from a grid of starting
points, the best ones are refined. We add no weight decay: the paper does not say which parameterisation it
decays, and without it a law is recovered exactly from its own noiseless losses (tests/test_scaling.py).

Compute-optimal allocation (section 6): FLOPs F = (12 d^2 c_f + d E G c_r) * D * n_blocks with c_f = 6,
c_r = 14 (embeddings excluded), total parameters N = d^2 (8E + 4) n_blocks (2 E d_ff d of experts, 4 d^2 of
attention; routing excluded), and the paper's shape rule d_model = 64 n_blocks. A budget then leaves one free
variable, d_model, found per G with Brent's method (the paper's choice), and G is taken from a grid of powers
of two. Its "64 x 100M" rows name E x N_act with N_act = 12 d^2 n_blocks; this reproduces Table 2's G on
every row, its N and D within a few percent, and its loss about 0.02 lower (the table's rounding, DESIGN 5.5).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

# The paper's FLOP constants (its appendix E): FLOPs per active parameter and token outside routing (c_f) and
# in routing (c_r). wider.models.gpt_moe uses the same two numbers for a preset's printed FLOPs; a test checks
# that they agree (this module does not import the model code, which needs torch).
C_F, C_R = 6, 14
# Section 6.1: "we opt to adopt the assumption that d_model = 64 n_blocks".
ASPECT = 64
HUBER_DELTA = 0.1
PAPER_GRANULARITIES = (1, 2, 4, 8, 16, 32, 64)


class ScalingError(ValueError):
    """Bad input to the scaling toolkit (a CSV, a coefficients file, a budget). The message says what and where."""


@dataclass(frozen=True)
class Law:
    """Coefficients of L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta; dense laws have no g, gamma."""

    a: float
    alpha: float
    b: float
    beta: float
    c: float
    g: float = 0.0
    gamma: float = 0.0
    dense: bool = False

    def names(self) -> tuple[str, ...]:
        return coefficient_names(self.dense)

    def loss(self, N, D, G=1.0) -> np.ndarray:
        """Predicted loss; N, D, G broadcast (G is ignored by a dense law)."""
        N, D, G = (np.asarray(v, dtype=np.float64) for v in (N, D, G))
        size_term = self.a if self.dense else self.g / G ** self.gamma + self.a
        return self.c + size_term / N ** self.alpha + self.b / D ** self.beta

    def coefficients(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.names()}

    def to_dict(self) -> dict:
        return {"dense": self.dense, "coefficients": self.coefficients()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "coefficients") -> "Law":
        """From `{"dense": ..., "coefficients": {...}}` (what `fit --json` prints) or a bare coefficient dict."""
        if not isinstance(d, dict):
            raise ScalingError(f"{source}: expected a JSON object with the law's coefficients")
        coeffs = d.get("coefficients", d)
        if not isinstance(coeffs, dict):
            raise ScalingError(f"{source}: 'coefficients' must be a JSON object such as {{\"a\": 18.1, ...}}")
        dense = bool(d.get("dense", "g" not in coeffs))
        values = {}
        for name in coefficient_names(dense):
            v = coeffs.get(name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ScalingError(f"{source}: coefficient {name!r} is missing or not a finite number "
                                   f"(a {'dense' if dense else 'MoE'} law needs {', '.join(coefficient_names(dense))})")
            values[name] = float(v)
        return cls(dense=dense, **values)


def coefficient_names(dense: bool) -> tuple[str, ...]:
    return ("a", "alpha", "b", "beta", "c") if dense else ("a", "alpha", "b", "beta", "g", "gamma", "c")


# Table 1 of the paper.
PAPER = Law(a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47)
PAPER_DENSE = Law(a=16.3, alpha=0.126, b=26.7, beta=0.127, c=0.47, dense=True)


def load_law(spec: str) -> Law:
    """'paper', 'paper-dense', or a JSON file written by `python -m wider.scaling fit --json`."""
    if spec == "paper":
        return PAPER
    if spec == "paper-dense":
        return PAPER_DENSE
    try:
        with open(spec) as f:
            data = json.load(f)
    except OSError as e:
        raise ScalingError(f"--coeffs {spec!r}: cannot read it ({e.strerror}); give 'paper', 'paper-dense' or "
                           "a JSON file from `fit --json`") from None
    except json.JSONDecodeError as e:
        raise ScalingError(f"--coeffs {spec!r}: not valid JSON ({e})") from None
    return Law.from_dict(data, source=spec)


# ----------------------------------------------------------------------------------------------------------
# Fitting


@dataclass
class Fit:
    law: Law
    rmse: float
    objective: float  # mean Huber loss of the residuals at the optimum
    rows: int
    starts: int  # BFGS runs from the best grid points
    grid_size: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    interval: float = 80.0  # percent of the bootstrap distribution between the bounds
    bootstrap: int = 0

    def to_dict(self) -> dict:
        out = {**self.law.to_dict(), "rmse": self.rmse, "huber_delta": HUBER_DELTA, "objective": self.objective,
               "rows": self.rows, "starts": self.starts, "grid_size": self.grid_size, "bootstrap": self.bootstrap}
        if self.intervals:
            lo, hi = (100 - self.interval) / 2, (100 + self.interval) / 2
            out["interval_percentiles"] = [lo, hi]
            out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return out


class _Problem:
    """Huber objective and its gradient in a centred log parameterisation.

    Internally the size and data terms are taken relative to the geometric mean of N and D
    (term_N = exp(A - alpha (ln N - mean ln N))): the coefficient a and the exponent alpha are then nearly
    uncorrelated, which BFGS, starting from an identity Hessian, needs to converge tightly. Order of theta:
    A, alpha, B, beta, C(=ln c) and, for MoE, H(=ln g at the mean N), gamma."""

    def __init__(self, N: np.ndarray, D: np.ndarray, G: np.ndarray, loss: np.ndarray, dense: bool):
        self.dense = dense
        self.mN, self.mD = float(np.mean(np.log(N))), float(np.mean(np.log(D)))
        self.x = np.log(N) - self.mN
        self.y = np.log(D) - self.mD
        self.z = np.log(G)
        self.loss = loss

    def terms(self, th: np.ndarray):
        """th: [k, P] -> the law's terms, each [k, rows]."""
        x, y, z = self.x[None], self.y[None], self.z[None]
        t_n = np.exp(th[:, 0:1] - th[:, 1:2] * x)
        t_d = np.exp(th[:, 2:3] - th[:, 3:4] * y)
        t_c = np.exp(th[:, 4:5]) * np.ones_like(x)
        t_g = None if self.dense else np.exp(th[:, 5:6] - th[:, 6:7] * z - th[:, 1:2] * x)
        return t_n, t_d, t_c, t_g

    def predict(self, th: np.ndarray) -> np.ndarray:
        t_n, t_d, t_c, t_g = self.terms(th)
        return t_n + t_d + t_c + (0.0 if t_g is None else t_g)

    def objective_many(self, th: np.ndarray) -> np.ndarray:
        return huber(self.predict(th) - self.loss[None]).mean(axis=1)

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        th = theta[None]
        t_n, t_d, t_c, t_g = (t if t is None else t[0] for t in self.terms(th))
        pred = t_n + t_d + t_c + (0.0 if t_g is None else t_g)
        r = pred - self.loss
        n = r.size
        w = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / n  # d(mean Huber)/d(prediction)
        size = t_n if t_g is None else t_n + t_g
        grad = [np.dot(w, t_n), -np.dot(w, size * self.x), np.dot(w, t_d), -np.dot(w, t_d * self.y), np.dot(w, t_c)]
        if t_g is not None:
            grad += [np.dot(w, t_g), -np.dot(w, t_g * self.z)]
        return float(huber(r).mean()), np.array(grad)

    def to_law(self, theta: np.ndarray) -> Law:
        A, alpha, B, beta, C = theta[:5]
        kw = dict(a=math.exp(A + alpha * self.mN), alpha=float(alpha), b=math.exp(B + beta * self.mD),
                  beta=float(beta), c=math.exp(C))
        if self.dense:
            return Law(dense=True, **kw)
        return Law(g=math.exp(theta[5] + alpha * self.mN), gamma=float(theta[6]), **kw)

    def grid(self) -> np.ndarray:
        """Starting points, Chinchilla-style: every combination of a few values per coefficient. The terms'
        sizes are set relative to the observed losses (at the mean N and D), so the grid fits any data scale."""
        mean_loss, min_loss = float(np.mean(self.loss)), float(np.min(self.loss))
        exps = (0.05, 0.1, 0.2, 0.4)
        term = [math.log(f * mean_loss) for f in (0.1, 0.25, 0.5, 1.0)]
        floor = [math.log(f * min_loss) for f in (0.05, 0.2, 0.4, 0.7)]
        axes = [term, exps, term, exps, floor]
        if not self.dense:
            axes += [[math.log(f * mean_loss) for f in (0.01, 0.05, 0.2)], [0.2, 0.5, 1.0]]
        return np.array(list(itertools.product(*axes)), dtype=np.float64)


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _bfgs(problem: _Problem, starts: np.ndarray) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    best, best_f = starts[0], math.inf
    for x0 in starts:
        with np.errstate(over="ignore", invalid="ignore"):
            res = minimize(problem.value_and_grad, x0, jac=True, method="BFGS",
                           options={"gtol": 1e-12, "maxiter": 5000})
        if np.all(np.isfinite(res.x)) and math.isfinite(res.fun) and res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    return best, best_f


def check_runs(N: np.ndarray, D: np.ndarray, G: np.ndarray, loss: np.ndarray, dense: bool) -> None:
    need = len(coefficient_names(dense)) + 1
    if len(loss) < need:
        raise ScalingError(f"the {'dense' if dense else 'MoE'} law has {need - 1} coefficients: fitting it needs "
                           f"at least {need} runs, got {len(loss)}")
    for name, values, coefs in (("N", N, "a, alpha"), ("D", D, "b, beta")):
        if len(np.unique(values)) < 2:
            raise ScalingError(f"every run has {name} = {values[0]:g}: the {name} term ({coefs}) cannot be fitted; "
                               f"add runs at other {name}")
    if not dense and len(np.unique(G)) < 2:
        raise ScalingError(f"every run has granularity G = {G[0]:g}: the G term (g, gamma) cannot be fitted; add "
                           "runs at other G or fit the dense law (--dense)")


def fit(N: Sequence[float], D: Sequence[float], G: Optional[Sequence[float]], loss: Sequence[float],
        dense: bool = False, restarts: int = 8, bootstrap: int = 0, interval: float = 80.0,
        seed: int = 0) -> Fit:
    """Fit the law by minimising the mean Huber loss (delta 0.1) of L_pred - L with BFGS from the `restarts`
    best points of a grid of starts; `bootstrap` > 0 adds percentile intervals from refits on rows resampled
    with replacement (the central `interval` percent; 80 = the paper's 10th-90th percentiles)."""
    N, D, loss = (np.asarray(v, dtype=np.float64) for v in (N, D, loss))
    G = np.ones_like(N) if G is None or dense else np.asarray(G, dtype=np.float64)
    check_runs(N, D, G, loss, dense)
    problem = _Problem(N, D, G, loss, dense)
    grid = problem.grid()
    with np.errstate(over="ignore", invalid="ignore"):
        scores = np.nan_to_num(problem.objective_many(grid), nan=np.inf)
    order = np.argsort(scores)
    starts = grid[order[:max(1, restarts)]]
    theta, obj = _bfgs(problem, starts)
    law = problem.to_law(theta)
    rmse = float(np.sqrt(np.mean((law.loss(N, D, G) - loss) ** 2)))
    out = Fit(law=law, rmse=rmse, objective=obj, rows=len(loss), starts=len(starts), grid_size=len(grid),
              interval=interval, bootstrap=bootstrap)
    if bootstrap > 0:
        out.intervals = _bootstrap(N, D, G, loss, dense, theta, starts[:2], bootstrap, interval, seed)
    return out


def _bootstrap(N, D, G, loss, dense: bool, theta: np.ndarray, extra_starts: np.ndarray, resamples: int,
               interval: float, seed: int) -> dict[str, tuple[float, float]]:
    """Refit on `resamples` row resamples, starting from the full-data optimum (and the two best grid points,
    in case a resample moves the optimum to another basin); percentile bounds of each coefficient."""
    rng = np.random.default_rng(seed)
    names = coefficient_names(dense)
    samples = []
    for _ in range(resamples):
        idx = rng.integers(0, len(loss), len(loss))
        if not dense and len(np.unique(G[idx])) < 2:
            continue  # a resample with one granularity says nothing about gamma
        p = _Problem(N[idx], D[idx], G[idx], loss[idx], dense)
        # theta is centred on the full data's means: move the size and data terms to this resample's means.
        t0 = theta.copy()
        shift = [(0, 1, p.mN - float(np.mean(np.log(N)))), (2, 3, p.mD - float(np.mean(np.log(D))))]
        if not dense:
            shift.append((5, 1, p.mN - float(np.mean(np.log(N)))))
        starts = [t0] + [s.copy() for s in extra_starts]
        for st in starts:
            for coef, expo, delta in shift:
                st[coef] -= st[expo] * delta
        th, _ = _bfgs(p, np.array(starts))
        law = p.to_law(th)
        samples.append([getattr(law, k) for k in names])
    if not samples:
        return {}
    arr = np.array(samples)
    lo, hi = (100 - interval) / 2, (100 + interval) / 2
    return {k: (float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi)))
            for i, k in enumerate(names)}


# ----------------------------------------------------------------------------------------------------------
# Shapes, FLOPs and the compute-optimal allocation


def n_blocks_for(d_model: float) -> float:
    return d_model / ASPECT


def total_params(d_model: float, expansion: float) -> float:
    """N = d^2 (8E + 4) n_blocks: experts 2 E d_ff d = 8 E d^2, attention 4 d^2 (E = 1: the dense 12 d^2)."""
    return d_model ** 2 * (8 * expansion + 4) * n_blocks_for(d_model)


def active_params(d_model: float) -> float:
    """N_act = 12 d^2 n_blocks: what one token applies outside embeddings and routing (the paper's "64 x N_act")."""
    return 12 * d_model ** 2 * n_blocks_for(d_model)


def flops_per_token(d_model: float, expansion: float, granularity: float, routing: bool = True) -> float:
    """(12 d^2 c_f + d E G c_r) n_blocks (eq. 10); without routing for a dense model."""
    route = d_model * expansion * granularity * C_R if routing else 0.0
    return (12 * d_model ** 2 * C_F + route) * n_blocks_for(d_model)


def d_model_for_params(N: float, expansion: float) -> float:
    """Inverse of total_params under d_model = 64 n_blocks."""
    return (N * ASPECT / (8 * expansion + 4)) ** (1.0 / 3.0)


@dataclass
class Point:
    """One allocation of a budget: the shape, the token count and the predicted loss."""

    flops: float
    granularity: float
    expansion: float
    d_model: float
    n_blocks: float
    N: float
    N_active: float
    D: float
    loss: float
    capped: bool = False  # the memory cap, not the law, set the size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Optimum:
    best: Point
    per_granularity: list[Point]
    at_grid_edge: bool  # the best G is the largest of a grid with more than one value: widen the grid

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "per_granularity": [p.to_dict() for p in self.per_granularity],
                "at_grid_edge": self.at_grid_edge}


def best_for_granularity(law: Law, flops: float, granularity: float, expansion: float,
                         max_params: Optional[float] = None) -> Point:
    """Minimise the law over d_model on the iso-FLOP curve for one G (Brent's method on log d_model).
    A dense law is a dense model: E = 1, no router, G = 1."""
    from scipy.optimize import minimize_scalar

    if not (math.isfinite(flops) and flops > 0):
        raise ScalingError(f"--flops must be a positive number, got {flops!r}")
    routing = not law.dense
    E, G = (expansion, granularity) if routing else (1.0, 1.0)

    def shape(log_d: float) -> tuple[float, float, float]:
        d = math.exp(log_d)
        return d, total_params(d, E), flops / flops_per_token(d, E, G, routing)

    def objective(log_d: float) -> float:
        _, N, D = shape(log_d)
        return float(law.loss(N, D, G))

    lo, hi = math.log(8.0), math.log(1e7)  # d_model from 8 to 10^7: far beyond any budget we are asked about
    capped = False
    if max_params is not None:
        if max_params <= total_params(8.0, E):
            raise ScalingError(f"--memory-cap-params {max_params:g} is below the smallest model considered")
        hi = math.log(d_model_for_params(max_params, E))
    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    log_d = float(res.x)
    if max_params is not None and hi - log_d < 1e-4:
        capped = True
    d, N, D = shape(log_d)
    return Point(flops=flops, granularity=G, expansion=E, d_model=d, n_blocks=n_blocks_for(d), N=N,
                 N_active=active_params(d), D=D, loss=float(law.loss(N, D, G)), capped=capped)


def optimal(law: Law, flops: float, expansion: float = 64, granularities: Iterable[float] = PAPER_GRANULARITIES,
            max_params: Optional[float] = None) -> Optimum:
    """The compute-optimal (N, D, G) for `flops` under `law`: the best d_model per G, then the best G. For a
    dense law, the dense model (E = 1, no router) at its best size."""
    grid = sorted({float(g) for g in granularities}) if not law.dense else [1.0]
    if not grid or min(grid) < 1:
        raise ScalingError(f"granularities must be >= 1, got {list(granularities)}")
    if expansion < 1:
        raise ScalingError(f"--expansion must be >= 1, got {expansion:g}")
    points = [best_for_granularity(law, flops, g, expansion, max_params) for g in grid]
    best = min(points, key=lambda p: p.loss)
    return Optimum(best=best, per_granularity=points,
                   at_grid_edge=len(grid) > 1 and best.granularity == grid[-1])


# Table 2 of the paper: FLOPs, E x N_act as (64, N_act), D, G, loss.
PAPER_TABLE2 = (
    (2.95e18, 100e6, 4.37e9, 8, 3.133),
    (1.93e20, 1e9, 28.94e9, 16, 2.491),
    (1.41e21, 3e9, 72.90e9, 16, 2.245),
    (6.46e21, 7e9, 137.60e9, 32, 2.076),
    (4.16e23, 70e9, 941.07e9, 32, 1.694),
    (5.69e24, 300e9, 2.96e12, 64, 1.503),
    (4.97e25, 1e12, 7.94e12, 64, 1.367),
)
