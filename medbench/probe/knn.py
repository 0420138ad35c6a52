"""k-nearest-neighbour classification on frozen features, DINO's weighted k-NN (Caron et al. 2021).

Features are L2-normalised, the similarity is the cosine (a dot product of normalised features), and
each of a query's ``k`` most similar training images votes with weight ``exp(similarity / T)``
(:data:`TEMPERATURE` = 0.07, DINO's). A probability is the vote share:

* multiclass: ``p_c = sum_j w_j [y_j = c] / sum_j w_j`` over the k neighbours (the classes sum to 1);
* binary and multilabel, per label: ``p_l = sum_j w_j y_jl / sum_j w_j`` over the k nearest training
  images *whose label l is known* (a missing label neither votes nor counts: neighbours are searched
  among the images annotated for that label).

The run stores the vote shares as logits (:func:`vote_logits`: log-shares, or log-odds, of the shares
clipped to ``[1e-12, 1 - 1e-12]``), so its predictions have the same columns as every run's.

``k`` is chosen on the validation split (:mod:`medbench.probe.selection`) from :data:`K_GRID`, each value
capped at the number of training images that can vote (so a 1-shot subset still gets a k); ties go to the
smaller k. A training image is never its own neighbour (queries come from other splits). Ties in
similarity at the k-th place are broken by ``torch.topk`` (the lower row index on CPU in practice); they
need exactly equal features.

Computed in blocks of at most :data:`QUERY_BLOCK` queries and :data:`BLOCK_ELEMENTS` similarities
(``[block, n_train]`` at a time), in float64 on CPU and float32 on a GPU.
"""

from __future__ import annotations

import time

import numpy as np

from medbench.probe.selection import Selection, choose

TEMPERATURE = 0.07
K_GRID: tuple[int, ...] = (5, 10, 20, 50, 100, 200)
QUERY_BLOCK = 1024
#: at most this many similarities at a time (256 MB in float64): fewer queries per block for a large training set
BLOCK_ELEMENTS = 1 << 25
VERSION = 1


def settings() -> dict:
    """What fixes a kNN probe's numbers beside its features (part of the run key)."""
    return {"protocol": "knn", "version": VERSION, "k_grid": list(K_GRID), "temperature": TEMPERATURE,
            "similarity": "cosine", "vote": "exp(sim / T) weighted, share of the k neighbours' weight"}


def candidate_ks(n_votes: int, grid: tuple[int, ...] = K_GRID) -> list[int]:
    """The k values to try for ``n_votes`` training images: the grid capped at ``n_votes``, no repeats."""
    return list(dict.fromkeys(min(k, n_votes) for k in grid)) if n_votes > 0 else []


class KNNProbe:
    """Normalised training features and labels; :meth:`predict_proba` for every k of a list at once."""

    def __init__(self, x_train: np.ndarray, y_train: np.ndarray, task_type: str, *, device: str = "cpu",
                 temperature: float = TEMPERATURE):
        import torch

        self.torch = torch
        self.device = device
        self.dtype = torch.float64 if device == "cpu" else torch.float32
        self.task_type = task_type
        self.temperature = temperature
        self.train = self._normalise(x_train)
        y = np.asarray(y_train, dtype=np.float64)
        self.outputs = y.shape[1]
        if task_type == "multiclass":
            self.onehot = torch.as_tensor(np.eye(self.outputs)[np.nan_to_num(y, nan=0.0).argmax(1)],
                                          dtype=self.dtype, device=device)
            self.known = None
        else:
            self.known = ~np.isnan(y)
            self.onehot = torch.as_tensor(np.nan_to_num(y, nan=0.0), dtype=self.dtype, device=device)

    def _normalise(self, x: np.ndarray):
        t = self.torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def votes_available(self) -> int:
        """How many training images vote for every output (the smallest over labels with missing values)."""
        if self.known is None:
            return int(self.train.shape[0])
        return int(self.known.sum(0).min())

    def predict_proba(self, x: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
        """Probabilities ``[n, outputs]`` for each k in ``ks``."""
        torch = self.torch
        q = self._normalise(x)
        out = {k: np.zeros((len(q), self.outputs), dtype=np.float64) for k in ks}
        if not ks or len(q) == 0:
            return out
        columns = [None] if self.known is None or self.known.all() else list(range(self.outputs))
        block = max(1, min(QUERY_BLOCK, BLOCK_ELEMENTS // max(1, self.train.shape[0])))
        for start in range(0, len(q), block):
            sims = q[start:start + block] @ self.train.T
            for col in columns:
                s = sims
                if col is not None:  # label col: only images annotated for it vote
                    allowed = torch.as_tensor(self.known[:, col], device=self.device)
                    s = sims.masked_fill(~allowed, float("-inf"))
                    available = int(self.known[:, col].sum())
                else:
                    available = s.shape[1]
                if available == 0:
                    for k in ks:
                        out[k][start:start + len(s), col] = np.nan
                    continue
                kmax = min(max(ks), available)
                top, idx = torch.topk(s, kmax, dim=1, largest=True, sorted=True)
                w = torch.exp(top / self.temperature)
                y = self.onehot[idx] if col is None else self.onehot[idx, col].unsqueeze(-1)  # [b, kmax, m]
                cum_votes = torch.cumsum(w.unsqueeze(-1) * y, dim=1)
                cum_w = torch.cumsum(w, dim=1)
                for k in ks:
                    j = min(k, kmax) - 1
                    p = (cum_votes[:, j] / cum_w[:, j:j + 1]).cpu().numpy()
                    if col is None:
                        out[k][start:start + len(s)] = p
                    else:
                        out[k][start:start + len(s), col] = p[:, 0]
        return out


#: vote shares are clipped to [EPS, 1 - EPS] where they become logits (a share of exactly 0 or 1 has none)
EPS = 1e-12


def vote_logits(probs: np.ndarray, task_type: str) -> np.ndarray:
    """Logits whose softmax (multiclass: log of the clipped share) or sigmoid (log-odds of the clipped share)
    gives the vote shares back to within :data:`EPS`: what the run's predictions store next to them."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) if task_type == "multiclass" else np.log(p) - np.log1p(-p)


def fit_knn_probe(x_train: np.ndarray, y_train: np.ndarray, task_type: str, x_val: np.ndarray,
                  selection: Selection, *, device: str = "cpu") -> tuple[KNNProbe, int, dict]:
    """(probe, chosen k, record): k chosen on the validation features."""
    started = time.perf_counter()
    probe = KNNProbe(x_train, y_train, task_type, device=device)
    ks = candidate_ks(probe.votes_available())
    if not ks:
        from medbench.errors import DataError

        raise DataError("no training image carries a label to vote with", field="labels")
    val = probe.predict_proba(x_val, ks)
    best, chosen = choose(ks, lambda i: vote_logits(val[ks[i]], task_type), selection)
    record = {"n_train": int(len(x_train)), "chosen": {"k": ks[best]},
              **{k: v for k, v in chosen.items() if k != "scores"},
              "sweep": [{"k": k, "val_score": s} for k, s in zip(ks, chosen["scores"])],
              "temperature": probe.temperature, "device": device,
              "dtype": str(probe.dtype).removeprefix("torch."), "seconds": time.perf_counter() - started}
    return probe, ks[best], record
