"""The linear probe: L2-regularised logistic regression on frozen features, as the literature does it.

**Formulation** (scikit-learn's ``LogisticRegression(penalty="l2", C=C)``, intercept not penalised):

* multiclass: one softmax over the classes, ``C * sum_i CE(y_i, W x_i + b) + ||W||^2 / 2``;
* binary and multilabel: one-vs-rest, an independent logistic regression per label with the same ``C``,
  ``C * sum_{i: y_il known} BCE(y_il, w_l x_i + b_l) + ||w_l||^2 / 2``: a missing label (U-Ignore, a label a
  dataset does not annotate) is left out of that label's loss, exactly as scoring leaves it out.

Features are **standardised** with the mean and standard deviation (ddof 0) of the training rows (a
constant feature is left centred, unscaled), then the objective is divided by the number of training rows
``n`` and minimised as ``mean loss + lambda / 2 ||W||^2`` with ``lambda = 1 / (C n)``: the same minimiser,
with a gradient tolerance that does not depend on ``n``. The regularisation is **swept** over
:data:`LAMBDAS` (17 values, 10^2 down to 10^-6 in half decades, strong to weak; each fit warm-started
from the previous one; the sweep stops once :data:`PATIENCE` weaker penalties in a row, two decades, have
not beaten the best validation score of the primary criterion, so the weakly regularised, slowly converging
fits are made only when they are still improving) and **chosen on the validation split**
(:mod:`medbench.probe.selection`) among the fitted values; the probe
is fitted on the training rows only (the chosen one is not refitted on train + val, so the test split and
the fine-tuned runs see the same training data).

**Solver**: full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search) until the largest absolute
gradient component of the scaled objective is below :data:`TOLERANCE`, in float64 on CPU (deterministic
for a given thread count) and float32 on a GPU. Each fit's iterations and final gradient are recorded; a
fit whose final gradient exceeds 100 x the tolerance (it stopped at :data:`MAX_ITER`, or its line search
could not make progress) is recorded as not converged.

The probe's output is logits (:meth:`LinearProbe.logits`, float64, finite), as a network's: the run turns
them into probabilities and scores them like fine-tuned runs' outputs.

Degenerate training data: a class absent from the training rows of a multiclass task gets probability 0
(the softmax runs over the classes present; its logit is set far below the others); a binary/multilabel label with a single class (or none) among
its training rows gets the constant probability ``(n_pos + 0.5) / (n + 1)`` and is listed under
``constant_labels``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from medbench.probe.selection import Selection, choose

#: lambda = 1 / (C n): the L2 strength per training row, strong to weak (the order ties are broken in)
LAMBDAS: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(4, -13, -1))
#: largest absolute gradient component of the scaled objective (mean loss + lambda / 2 ||W||^2) at the end,
#: in float64 (CPU); float32 (GPU) stops at :data:`TOLERANCE_FLOAT32`
TOLERANCE = 1e-9
TOLERANCE_FLOAT32 = 1e-5
MAX_ITER = 2000
#: a class absent from the training rows: its logit this far below the row's lowest fitted one (probability 0)
ABSENT_CLASS_LOGIT = 1000.0
#: the sweep stops after this many weaker penalties (two decades) without a better validation score
PATIENCE = 4
VERSION = 2
#: on CPU, a problem with fewer multiply-adds per evaluation (rows x features x outputs) is solved on one
#: thread: L-BFGS makes thousands of small evaluations, where thread hand-offs cost far more than they save
#: (measured: 0.45 ms single-threaded vs 36-90 ms on 2 busy cores for 65 x 512 x 3), and the fit's numbers
#: then do not depend on --threads
SINGLE_THREAD_BELOW = 20_000_000


def settings() -> dict:
    """What fixes a linear probe's numbers beside its features (part of the run key)."""
    return {"protocol": "linear", "version": VERSION, "lambdas": list(LAMBDAS), "patience": PATIENCE,
            "tolerance": TOLERANCE,
            "tolerance_float32": TOLERANCE_FLOAT32,
            "max_iter": MAX_ITER, "standardise": "train mean/std (ddof 0)", "solver": "torch L-BFGS strong-Wolfe",
            "multiclass": "softmax", "multilabel": "one-vs-rest, missing labels masked"}


@dataclass
class LinearProbe:
    """A fitted probe: standardisation and weights, enough to predict any features of the same extractor."""

    task_type: str
    num_outputs: int
    mean: np.ndarray  # [d]
    scale: np.ndarray  # [d]
    weight: np.ndarray  # [d, m] float64 (m: classes present, or labels)
    bias: np.ndarray  # [m]
    #: multiclass: the output column of each fitted class; binary/multilabel: None (all labels)
    classes: np.ndarray | None
    #: binary/multilabel: label index -> constant probability for labels that could not be fitted
    constant: dict[int, float]

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits ``[n, outputs]`` in float64, finite: ``z W + b`` on the standardised features; a constant
        label's log-odds; a class absent from training :data:`ABSENT_CLASS_LOGIT` below the row's lowest
        fitted logit (its softmax probability underflows to 0)."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        fitted = z @ self.weight + self.bias
        if self.task_type == "multiclass":
            out = np.empty((len(z), self.num_outputs), dtype=np.float64)
            out[:] = (fitted.min(1, keepdims=True) if fitted.size else 0.0) - ABSENT_CLASS_LOGIT
            out[:, self.classes] = fitted
            return out
        for k, p in self.constant.items():
            fitted[:, k] = np.log(p) - np.log1p(-p)
        return fitted



def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale (std, ddof 0; 1 for a constant feature) of the training features."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)


def _targets(y: np.ndarray, task_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, float]]:
    """(targets, mask, classes, constant labels): class indices among present classes for multiclass,
    0/1 with a known-label mask per label otherwise."""
    y = np.asarray(y, dtype=np.float64)
    if task_type == "multiclass":
        cls = np.nan_to_num(y, nan=0.0).argmax(1)
        classes = np.unique(cls)
        remap = np.full(y.shape[1], -1)
        remap[classes] = np.arange(len(classes))
        return remap[cls], np.ones(len(y), dtype=bool), classes, {}
    mask = ~np.isnan(y)
    t = np.nan_to_num(y, nan=0.0)
    constant = {}
    for k in range(y.shape[1]):
        known = t[mask[:, k], k]
        if len(known) == 0 or known.min() == known.max():
            constant[k] = float((known.sum() + 0.5) / (len(known) + 1))
            mask[:, k] = False  # nothing to fit: its weights stay 0, its probability is the constant
    return t, mask, None, constant


class _Problem:
    """The scaled objective on one device: mean masked loss + lambda / 2 ||W||^2, minimised in preconditioned
    coordinates ``W = U * sw``, ``b = V * sb`` (a diagonal preconditioner from the curvature at the start: about
    ``lambda + q`` per weight, ``q`` the mean ``p (1 - p)`` of the outputs on unit-variance features, and
    ``p (1 - p)`` per intercept, ``p`` the training rate of the class or label). Without it a strong
    penalty on ``W`` next to a rare label's unpenalised intercept leaves L-BFGS thousands of iterations on a
    problem whose solution is an intercept (measured: 2000 iterations unconverged at lambda = 31.6 on NIH,
    20-odd with it). The minimiser is the same."""

    def __init__(self, z, t, mask, multiclass: bool, outputs: int, device: str):
        import torch

        self.torch = torch
        self.dtype = torch.float64 if device == "cpu" else torch.float32
        self.z = torch.as_tensor(z, dtype=self.dtype, device=device)
        self.multiclass = multiclass
        self.n = len(z)
        self.tolerance = TOLERANCE if self.dtype == torch.float64 else TOLERANCE_FLOAT32
        if multiclass:
            self.t = torch.as_tensor(t, dtype=torch.long, device=device)
            rate = np.bincount(np.asarray(t), minlength=outputs) / max(len(t), 1)
        else:
            self.t = torch.as_tensor(t, dtype=self.dtype, device=device)
            self.mask = torch.as_tensor(mask, dtype=self.dtype, device=device)
            known = np.maximum(np.asarray(mask).sum(0), 1)
            rate = (np.asarray(t) * np.asarray(mask)).sum(0) / known
        curvature = np.clip(rate * (1 - rate), 1e-3, 0.25)
        self.q = float(curvature.mean())
        self.sb = torch.as_tensor(1.0 / np.sqrt(curvature), dtype=self.dtype, device=device)
        self.sw = 1.0
        # start at the training rates (the solution of a very strong penalty)
        logit = np.log(np.clip(rate, 1e-6, 1)) if multiclass else np.log(np.clip(rate, 1e-6, 1 - 1e-6) /
                                                                          np.clip(1 - rate, 1e-6, 1))
        self.w = torch.zeros((z.shape[1], outputs), dtype=self.dtype, device=device)
        self.b = torch.as_tensor(logit, dtype=self.dtype, device=device)

    def loss(self, lam: float, w=None, b=None):
        import torch.nn.functional as F

        w = self.w if w is None else w
        b = self.b if b is None else b
        logits = self.z @ w + b
        if self.multiclass:
            data = F.cross_entropy(logits, self.t, reduction="sum")
        else:
            data = (F.binary_cross_entropy_with_logits(logits, self.t, reduction="none") * self.mask).sum()
        return data / self.n + 0.5 * lam * (w * w).sum()

    def fit(self, lam: float) -> dict:
        torch = self.torch
        sw = 1.0 / float(np.sqrt(lam + self.q))
        u = (self.w / sw).detach().clone().requires_grad_(True)
        v = (self.b / self.sb).detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([u, v], lr=1.0, max_iter=MAX_ITER, max_eval=MAX_ITER * 2,
                                tolerance_grad=self.tolerance, tolerance_change=0.0, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = self.loss(lam, u * sw, v * self.sb)
            value.backward()
            return value

        opt.step(closure)
        iters = int(opt.state[opt._params[0]].get("n_iter", 0))
        self.w, self.b = (u * sw).detach(), (v * self.sb).detach()
        w, b = self.w.clone().requires_grad_(True), self.b.clone().requires_grad_(True)
        value = self.loss(lam, w, b)
        value.backward()
        grad = max(float(w.grad.abs().max()) if w.numel() else 0.0, float(b.grad.abs().max()))
        return {"objective": float(value.detach()), "max_gradient": grad, "iterations": iters,
                "converged": grad <= self.tolerance * 100}

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        return (self.w.cpu().double().numpy().copy(), self.b.cpu().double().numpy().copy())


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's CPU thread count set to ``n`` inside the block (unchanged for None)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, task_type: str, x_val: np.ndarray,
                     selection: Selection, *, device: str = "cpu", lambdas: tuple[float, ...] = LAMBDAS
                     ) -> tuple[LinearProbe, dict]:
    """The probe fitted on the training features at the regularisation chosen on the validation features.

    ``y_train`` is ``[n, outputs]`` (1/0, NaN missing; one-hot for multiclass). Returns the probe and a
    record: the sweep (lambda, C, validation score, iterations, convergence), the choice, seconds.
    """
    started = time.perf_counter()
    x_train = np.asarray(x_train, dtype=np.float64)
    outputs = int(np.asarray(y_train).shape[1])
    mean, scale = standardisation(x_train)
    z = (x_train - mean) / scale
    t, mask, classes, constant = _targets(y_train, task_type)
    multiclass = task_type == "multiclass"
    m = len(classes) if multiclass else outputs
    problem = _Problem(z, t, mask, multiclass, m, device)
    n = len(z)
    fits, probes = [], []
    name, primary = selection.primary
    best_score, best_at = None, None
    with _threads(1 if device == "cpu" and n * z.shape[1] * m < SINGLE_THREAD_BELOW else None):
        for i, lam in enumerate(lambdas):  # strong to weak, each warm-started from the previous solution
            info = problem.fit(lam)
            w, b = problem.weights()
            probes.append(LinearProbe(task_type, outputs, mean, scale, w, b, classes, constant))
            fits.append({"lambda": lam, "C": 1.0 / (lam * n), **info})
            score = primary(probes[-1].logits(x_val))
            if score is not None and not np.isnan(score) and (best_score is None or score > best_score):
                best_score, best_at = score, i
            if best_at is not None and i - best_at >= PATIENCE:
                break  # no better validation score for PATIENCE weaker penalties: the rest of the sweep is skipped
    lambdas = tuple(lambdas[:len(fits)])
    best, chosen = choose(lambdas, lambda i: probes[i].logits(x_val), selection)
    for f, s in zip(fits, chosen.pop("scores")):
        f["val_score"] = s
    record = {"n_train": n, "chosen": {"lambda": lambdas[best], "C": 1.0 / (lambdas[best] * n)},
              **chosen, "sweep": fits, "converged": fits[best]["converged"],
              "constant_labels": sorted(constant), "classes_fitted": classes.tolist() if classes is not None else None,
              "device": device, "dtype": str(problem.dtype).removeprefix("torch."),
              "seconds": time.perf_counter() - started}
    return probes[best], record
