"""Bootstrap confidence intervals, vectorized: every score of a scope from one pass of resamples.

**Resampling unit.** When patients repeat in a scored set (several images of
one patient), whole patients are resampled (cluster bootstrap); otherwise
images. Units are numbered in sorted-id order, so the same set scored by any
run (another seed, another backbone) gets the *same* resamples: replicate
``b`` of two runs is the same multiset of patients, which is what makes seed
averaging of replicates and paired comparisons valid.

**Resamples as weights.** Resample ``b`` is a vector of counts (how often each
unit was drawn, ``n_units`` draws with replacement). Every score medbench
bootstraps is a function of a few *linear statistics* — sums over subsets of
samples of a per-sample value (correct decisions, squared errors, counts per
calibration bin, counts per score group for the AUC). A :class:`LinearStats`
collects those sums as rows of a matrix ``M`` (rows x units; sparse for
partitions such as score groups and calibration bins, dense for sums over
many samples), so the sums of a chunk of resamples are one product
``M @ counts``;
each metric's *finalizer* turns the sums into replicate values, vectorized
over resamples. The same finalizer on unit weights gives the point estimate,
which tests check against the libraries (sklearn, netcal, fairlearn).

**Undefined components.** An aggregate over components (macro AUC over
labels, a worst group or a gap over groups, a mean over labels) is taken over
the components *defined at the point estimate*: a component undefined there
(a label with one class in the test set, a group lacking a class) is left out
of the point and of every replicate alike. A replicate in which a component
that is defined at the point is undefined (a label or a group that drew one
class in that resample) makes the aggregate's replicate undefined, never an
aggregate over what remains (:func:`strict_mean`; builders learn which
components are defined at the point from :meth:`LinearStats.point_now`).

**Intervals.** Percentile intervals (default 95 %) over the defined
replicates; a replicate where a score is undefined (e.g. a label with one
class in that resample) is counted in ``n_undefined``, not imputed. For the
binned calibration errors (ECE, MCE), whose plug-in estimate is biased upward
(so that bootstrap replicates are biased upward once more, and the percentile
interval can sit above its own point estimate), the interval is the percentile
interval of the *bias-corrected* replicates ``theta* - (mean(theta*) - theta)``
(Efron & Tibshirani 1993, ch. 10), kept within the metric's range [0, 1]: it
describes the sampling spread of the reported estimate around itself, and
``bias`` reports the bootstrap estimate of the upward bias (see
docs/metrics.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from medbench.predictions import Predictions
from medbench.utils import usable_cores

#: a finalizer turns linear sums ``[rows, b]`` into named replicate arrays ``[b]``
Finalizer = Callable[[np.ndarray], dict[str, np.ndarray]]
#: target number of float64 cells in one chunk of resample weights (~64 MB) ...
CHUNK_CELLS = 8_000_000
#: ... and in one part of sparse sums (~64 MB; a million rows, AUC groups of a large test set in every subgroup,
#: take 8 resamples at a time: the sparse product reads scattered rows of the counts, which stay in cache)
SUMS_CELLS = 8_000_000
#: the sparse product is split into row blocks computed by this many threads (scipy releases the GIL)
THREADS = max(1, min(usable_cores(), 8))
#: a sum over at least this share of the samples is a dense row (BLAS) ...
DENSE_MIN_SHARE = 0.2
#: ... while the dense rows hold at most this many cells (~256 MB)
DENSE_CELLS = 32_000_000


# --------------------------------------------------------------------------- resampling


@dataclass(frozen=True)
class Resampling:
    """How a scored set is resampled: units, count, seed; :meth:`counts` yields the resamples."""

    scope: str
    n_resamples: int
    seed: int
    unit: str  # "patient" or "sample"
    unit_of: np.ndarray  # [N] unit index of every sample, in [0, n_units)
    n_units: int
    fingerprint: str  # of (unit, sample ids, unit ids): equal fingerprints = equal resamples

    @classmethod
    def of(cls, preds: Predictions, *, n_resamples: int, seed: int, scope: str) -> "Resampling":
        table = preds.table
        sample_ids = [str(s) for s in table["sample_id"].to_list()] if "sample_id" in table.columns else \
            [str(i) for i in range(table.height)]
        patients = table["patient_id"].to_list() if "patient_id" in table.columns else [None] * table.height
        keys = [f"p:{p}" if p is not None else f"s:{s}" for p, s in zip(patients, sample_ids)]
        unit = "patient" if len(set(keys)) < len(keys) else "sample"
        if unit == "sample":
            keys = [f"s:{s}" for s in sample_ids]
        uniq, unit_of = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
        order = np.argsort(np.asarray(sample_ids, dtype=str), kind="stable")
        h = hashlib.sha256(json.dumps([unit, [sample_ids[i] for i in order], [keys[i] for i in order]]).encode())
        return cls(scope=scope, n_resamples=int(n_resamples), seed=int(seed), unit=unit,
                   unit_of=unit_of.astype(np.int64), n_units=len(uniq), fingerprint=h.hexdigest()[:16])

    def describe(self) -> dict:
        return {"n_resamples": self.n_resamples, "seed": self.seed, "unit": self.unit, "n_units": self.n_units,
                "n_samples": int(self.unit_of.size), "fingerprint": self.fingerprint}

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.scope.encode())])

    def counts(self, chunk: int | None = None, *, reuse: bool = False) -> Iterator[np.ndarray]:
        """Resample counts per unit, ``[n_units, b]`` float64 (C-contiguous), in chunks; the stream does not
        depend on the chunk size. With ``reuse`` every chunk is written into the same array (valid until the
        next one is drawn): no fresh pages per chunk, which the kernel must zero first."""
        k = self.n_units
        if chunk is None:
            chunk = max(1, min(self.n_resamples, CHUNK_CELLS // max(k, 1)))
        rng = self.rng()
        done = 0
        by_resample = by_unit = None
        while done < self.n_resamples:
            b = min(chunk, self.n_resamples - done)
            draws = rng.integers(0, k, size=(b, k), dtype=np.uint32)
            if by_resample is None or not reuse:
                by_resample, by_unit = np.empty((b, k)), np.empty(b * k)
            rows = by_resample[:b]
            for j in range(b):  # the units drawn in resample j, counted
                rows[j] = np.bincount(draws[j], minlength=k)
            counts = by_unit[: k * b].reshape(k, b)
            np.copyto(counts, rows.T)
            yield counts
            done += b

    def sample_indices(self, counts_column: np.ndarray) -> np.ndarray:
        """The resample as row indices (for per-resample reference loops): every sample of a unit
        drawn ``c`` times appears ``c`` times."""
        per_sample = counts_column[self.unit_of].astype(np.int64)
        return np.repeat(np.arange(self.unit_of.size), per_sample)


# --------------------------------------------------------------------------- linear statistics


class LinearStats:
    """Rows of weighted sums over samples: ``sum_i w_i * value_i`` over each row's samples.

    With ``unit_of`` the columns are resampling units: the entries of one unit in one row are summed
    as they are added (each call adds a block of new rows, sorted by row and unit), so the sparse
    matrix is assembled without a global sort. Identical blocks (the same rows of the same values, e.g.
    the bins of ECE and of MCE, a label's count in several metrics) are registered once and shared.

    ``point_only``: only the point sums are kept (:meth:`point_now`; no matrix, no dense rows, no sharing), for
    scores without resamples; a row's point sum is then added in sample order, as a sparse row's product with
    unit weights adds it."""

    def __init__(self, n: int, unit_of: np.ndarray | None = None, n_units: int | None = None, *,
                 point_only: bool = False):
        self.n = n
        self.point_only = point_only
        self.unit_of = np.arange(n, dtype=np.int64) if unit_of is None else np.asarray(unit_of, dtype=np.int64)
        self.n_units = n if unit_of is None else int(n_units)
        self.n_rows = 0
        self._row_counts: list[tuple[int, np.ndarray]] = []  # (first row, entries per row) of each sparse block
        self._cols: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self._shared: dict[bytes, int] = {}  # content digest of a block -> its first row (identical blocks shared)
        self._dense_ids: list[int] = []
        self._dense: np.ndarray | None = None  # the dense rows, filled in place (pages touched as rows are added)
        self._point = np.zeros(64)  # the sums with every sample weighted once, rows [0, n_rows) (grown by doubling)

    def add_rows(self, row_of: np.ndarray, n_rows: int, values: np.ndarray | float = 1.0) -> int:
        """``n_rows`` new rows; sample ``i`` adds ``values[i]`` to row ``row_of[i]`` (``-1``: to none).
        Returns the index of the first new row."""
        row_of = np.asarray(row_of, dtype=np.int64)
        samples = np.flatnonzero(row_of >= 0)
        vals = np.asarray(values, dtype=np.float64)
        return self.add_rows_at(samples, row_of[samples], n_rows, vals if vals.ndim == 0 else vals[samples])

    def add_rows_at(self, samples: np.ndarray, rows: np.ndarray, n_rows: int, values: np.ndarray | float = 1.0
                    ) -> int:
        """:meth:`add_rows` given only the samples that add to a row (ascending sample indices), their rows and
        values: sample ``samples[j]`` adds ``values[j]`` to row ``rows[j]``. Returns the index of the first new
        row."""
        first = self.n_rows
        samples = np.asarray(samples, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        vals = np.asarray(values, dtype=np.float64)
        vals = np.full(samples.size, float(vals)) if vals.ndim == 0 else vals
        if self.point_only:
            self._add_point(np.bincount(rows, weights=vals, minlength=n_rows)[:n_rows])
            self.n_rows += n_rows
            return first
        digest = _digest(b"rows", np.int64(n_rows).tobytes(), samples, rows, vals)
        if digest in self._shared:  # the same block again (e.g. ECE and MCE bin the same confidences)
            return self._shared[digest]
        self._shared[digest] = first
        key = rows * self.n_units + self.unit_of[samples]
        uniq, inv = np.unique(key, return_inverse=True)
        self._row_counts.append((first, np.bincount(uniq // self.n_units, minlength=n_rows)[:n_rows]))
        self._cols.append(uniq % self.n_units)
        self._vals.append(np.bincount(inv, weights=vals, minlength=uniq.size))
        self._add_point(np.bincount(rows, weights=vals, minlength=n_rows)[:n_rows])
        self.n_rows += n_rows
        return first

    def add_sum(self, mask: np.ndarray, values: np.ndarray | float = 1.0) -> int:
        """One row: the weighted sum of ``values`` over the samples where ``mask`` holds. Rows over
        many samples are kept dense (a BLAS product), within a memory budget."""
        mask = np.asarray(mask, dtype=bool)
        samples = np.flatnonzero(mask)
        given = np.asarray(values, dtype=np.float64)
        vals = np.full(samples.size, float(given)) if given.ndim == 0 else np.broadcast_to(given, mask.shape)[samples]
        if self.point_only:
            return self.add_rows_at(samples, np.zeros(samples.size, dtype=np.int64), 1, vals)
        # identical sums (the same mask and values, e.g. a label's count in several metrics) share one row
        digest = _digest(b"sum", np.packbits(mask), vals)
        if digest in self._shared:
            return self._shared[digest]
        if samples.size / max(mask.size, 1) >= DENSE_MIN_SHARE and \
                (len(self._dense_ids) + 1) * self.n_units <= DENSE_CELLS:
            if self._dense is None:  # reserved at the budget; only the rows written are ever touched
                self._dense = np.empty((max(1, DENSE_CELLS // max(self.n_units, 1)), self.n_units))
            row_values = self._dense[len(self._dense_ids)]
            row_values[...] = np.bincount(self.unit_of[samples], weights=vals, minlength=self.n_units)
            self._dense_ids.append(self.n_rows)
            self._add_point(np.array([float(row_values.sum())]))
            self.n_rows += 1
            row = self.n_rows - 1
        else:
            row = self.add_rows_at(samples, np.zeros(samples.size, dtype=np.int64), 1, vals)
        self._shared[digest] = row
        return row

    def point_now(self) -> np.ndarray:
        """The point sums (every sample weighted once) of the rows registered so far, ``[rows, 1]``: a builder
        evaluates its components' finalizers on them to learn which are defined at the point estimate."""
        return self._point[: self.n_rows].reshape(-1, 1)

    def _add_point(self, block: np.ndarray) -> None:
        end = self.n_rows + block.size
        if end > self._point.size:
            grown = np.zeros(max(end, 2 * self._point.size))
            grown[: self.n_rows] = self._point[: self.n_rows]
            self._point = grown
        self._point[self.n_rows : end] = block

    def matrix(self) -> "SumsOperator":
        """The linear map from unit weights ``[units, b]`` to the sums ``[rows, b]``."""
        if self.point_only:
            raise ValueError("point-only statistics keep no matrix")
        import scipy.sparse as sp

        per_row = np.zeros(self.n_rows, dtype=np.int64)
        for first, counts in self._row_counts:
            per_row[first : first + counts.size] = counts
        nnz = int(per_row.sum())
        index = np.int32 if max(nnz, self.n_units, self.n_rows) < np.iinfo(np.int32).max else np.int64
        cols = np.empty(nnz, dtype=index)
        vals = np.empty(nnz)
        at = 0
        for c, v in zip(self._cols, self._vals):  # the blocks in row order (a shared block adds none)
            cols[at : at + c.size] = c
            vals[at : at + v.size] = v
            at += c.size
        indptr = np.zeros(self.n_rows + 1, dtype=index)
        np.cumsum(per_row, out=indptr[1:])
        sparse = sp.csr_matrix((vals, cols, indptr), shape=(self.n_rows, self.n_units))
        dense = self._dense[: len(self._dense_ids)] if self._dense_ids else None
        # row blocks of about equal entries, one per thread (each row is computed as in one product)
        cuts = np.searchsorted(indptr, np.linspace(0, indptr[-1], THREADS + 1)[1:-1]) if indptr[-1] else []
        bounds = [0, *sorted({int(c) for c in cuts} - {0, self.n_rows}), self.n_rows]
        blocks = list(zip(bounds, bounds[1:])) if len(bounds) > 2 else []
        return SumsOperator(sparse, dense, np.asarray(self._dense_ids, dtype=np.int64), blocks)

    def point_sums(self, m: "SumsOperator | None" = None) -> np.ndarray:
        """Sums with every sample weighted once, ``[rows, 1]``: each unit weighted by its size."""
        if self.point_only:
            return self.point_now()
        m = self.matrix() if m is None else m
        return m @ np.ones((self.n_units, 1))


@dataclass
class SumsOperator:
    """Sparse rows (partitions: score groups, calibration bins) and dense rows (sums over many samples)."""

    sparse: object  # scipy CSR [rows, units]; dense rows are empty here
    dense: np.ndarray | None  # [dense rows, units]
    dense_ids: np.ndarray
    blocks: list | None = None  # (first row, end row): the sparse product's parallel parts

    @property
    def shape(self) -> tuple[int, int]:
        return self.sparse.shape

    def __matmul__(self, counts: np.ndarray) -> np.ndarray:
        out = self.sparse_product(counts)
        if self.dense is not None:
            out[self.dense_ids] = self.dense @ counts
        return out

    def sparse_product(self, counts: np.ndarray, out: np.ndarray | None = None, pool=None) -> np.ndarray:
        """``[rows, b]``: the sparse rows' sums (the dense rows' left for :attr:`dense`), in parallel row blocks
        (``pool``: an executor to run them in, else threads of its own), written into ``out`` when given (a
        C-contiguous ``[rows, b]`` array, reused across calls: a fresh 64 MB result per call cost more in page
        faults than the product itself)."""
        if counts.shape[1] == 1:  # one vector: scipy's matrix-vector kernel, as always
            result = np.asarray(self.sparse @ counts)
            if out is None:
                return result
            out[...] = result
            return out
        counts = np.ascontiguousarray(counts, dtype=np.float64)
        if out is None:
            out = np.empty((self.shape[0], counts.shape[1]))
        if not self.blocks:
            self._rows_product(0, self.shape[0], counts, out)
            return out
        from concurrent.futures import ThreadPoolExecutor

        with contextlib.nullcontext(pool) if pool is not None else ThreadPoolExecutor(len(self.blocks)) as runner:
            list(runner.map(lambda ab: self._rows_product(*ab, counts, out), self.blocks))
        return out

    def _rows_product(self, a: int, b: int, counts: np.ndarray, out: np.ndarray) -> None:
        """``out[a:b] = sparse[a:b] @ counts``: scipy's CSR kernel for several vectors (the one ``sparse @ counts``
        runs, each row's entries added in the same order) accumulating in place into the zeroed rows."""
        y = out[a:b]
        kernel = _csr_matvecs()
        if kernel is None or not y.flags.c_contiguous:
            y[...] = self.sparse[a:b] @ counts
            return
        m = self.sparse
        y.fill(0.0)
        kernel(b - a, m.shape[1], counts.shape[1], m.indptr[a : b + 1], m.indices, m.data, counts.ravel(), y.reshape(-1))


def _csr_matvecs():
    """scipy's in-place CSR-times-dense kernel (``y += A @ X``), or None where this scipy lacks it."""
    try:
        from scipy.sparse._sparsetools import csr_matvecs
    except ImportError:  # pragma: no cover - a scipy without the private kernel: the public product
        return None
    return csr_matvecs


def _digest(*parts) -> bytes:
    """sha256 of byte strings and arrays (read in place, not copied), each prefixed by its length."""
    h = hashlib.sha256()
    for part in parts:
        view = memoryview(np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part)
        h.update(view.nbytes.to_bytes(8, "little"))
        h.update(view.cast("B"))
    return h.digest()


#: a builder registers its rows in ``stats`` and returns the finalizer of its scores
Builder = Callable[[LinearStats], Finalizer]


@dataclass
class ScopeResult:
    """Point estimates and replicates of every score of one scope."""

    point: dict[str, float | None]
    replicates: dict[str, np.ndarray]
    resampling: Resampling | None


def evaluate(n: int, builders: Sequence[Builder], resampling: Resampling | None) -> ScopeResult:
    """Point estimates (unit weights) and, with ``resampling``, replicates of every builder's scores."""
    if resampling is None or resampling.n_resamples == 0 or n == 0:
        resampling = None
        stats = LinearStats(n, point_only=True)  # the point sums are all there is to compute
        finals = [b(stats) for b in builders]
        m, point_sums = None, stats.point_now()
    else:
        stats = LinearStats(n, resampling.unit_of, resampling.n_units)
        finals = [b(stats) for b in builders]
        m = stats.matrix()
        point_sums = stats.point_sums(m)
    point: dict[str, float | None] = {}
    for f in finals:
        for key, arr in f(point_sums).items():
            v = float(np.asarray(arr).reshape(-1)[0])
            point[key] = v if np.isfinite(v) else None
    replicates: dict[str, list[np.ndarray]] = {}
    if resampling is not None:
        # a chunk of counts [units, b] and the dense rows' sums (BLAS: faster with more resamples at once); within
        # it, the sparse sums [rows, b'] of fewer resamples at a time (their scattered reads stay in cache). The next
        # part (its counts, dense sums and sparse sums) is computed in a thread while the finalizers run on this
        # part's, into the other of two reused buffers; the finalizers' values are copied out of the buffer
        from concurrent.futures import ThreadPoolExecutor

        chunk = max(1, min(resampling.n_resamples, CHUNK_CELLS // max(resampling.n_units, 1)))
        part = max(1, min(chunk, SUMS_CELLS // max(m.shape[0], 1)))
        rows = m.shape[0]
        buffers = [np.empty(rows * part), np.empty(rows * part)]

        def parts():
            part_counts = np.empty(resampling.n_units * part)  # one part's counts, reused (consumed in turn)
            for counts in resampling.counts(chunk, reuse=True):
                dense = m.dense @ counts if m.dense is not None else None
                for a in range(0, counts.shape[1], part):
                    cols = counts[:, a : a + part]
                    here = part_counts[: cols.size].reshape(cols.shape)
                    np.copyto(here, cols)
                    yield here, None if dense is None else dense[:, a : a + part]

        items = parts()

        def next_sums(buffer: np.ndarray) -> np.ndarray | None:
            item = next(items, None)
            if item is None:
                return None
            sums = m.sparse_product(item[0], buffer[: rows * item[0].shape[1]].reshape(rows, item[0].shape[1]),
                                    pool=blocks)
            if item[1] is not None:
                sums[m.dense_ids] = item[1]
            return sums

        with ThreadPoolExecutor(1) as ahead, ThreadPoolExecutor(max(1, len(m.blocks or ()))) as blocks:
            turn = 0
            pending = ahead.submit(next_sums, buffers[turn])
            while True:
                sums = pending.result()
                if sums is None:
                    break
                turn = 1 - turn
                pending = ahead.submit(next_sums, buffers[turn])
                for f in finals:
                    for key, arr in f(sums).items():
                        replicates.setdefault(key, []).append(np.array(arr, dtype=np.float64))
    return ScopeResult(point, {k: np.concatenate(v) for k, v in replicates.items()}, resampling)


# --------------------------------------------------------------------------- helpers for finalizers


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0 (undefined)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def defined_at_point(stats: LinearStats, finalize: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Whether a component (a finalizer of rows already registered in ``stats``) is defined at the point."""
    return bool(np.isfinite(np.asarray(finalize(stats.point_now()), dtype=np.float64)).all())


def strict_mean(arrays: Sequence[np.ndarray], defined: Sequence[bool]) -> np.ndarray:
    """Per replicate, the mean of the components defined at the point (``defined``); NaN in a replicate
    where one of them is undefined, and everywhere when none is defined at the point."""
    chosen = [np.asarray(a, dtype=np.float64).reshape(-1) for a, d in zip(arrays, defined) if d]
    if not chosen:
        n = np.asarray(arrays[0]).reshape(-1).size if len(arrays) else 1
        return np.full(n, np.nan)
    return np.mean(np.vstack(chosen), axis=0)


def strict_extreme(arrays: Sequence[np.ndarray], defined: Sequence[bool], how: str, at_least: int = 1) -> np.ndarray:
    """Per replicate, the min, max or range (``how``: "min", "max", "gap") over the components defined at the
    point, NaN in a replicate where one of them is undefined, and everywhere when fewer than ``at_least`` are
    defined at the point."""
    chosen = [np.asarray(a, dtype=np.float64).reshape(-1) for a, d in zip(arrays, defined) if d]
    if len(chosen) < max(at_least, 1):
        n = np.asarray(arrays[0]).reshape(-1).size if len(arrays) else 1
        return np.full(n, np.nan)
    stack = np.vstack(chosen)
    with np.errstate(invalid="ignore"):
        lo, hi = stack.min(0), stack.max(0)  # NaN propagates: one undefined component, undefined replicate
    return {"min": lo, "max": hi, "gap": hi - lo}[how]


# --------------------------------------------------------------------------- intervals


#: interval rules: ``percentile`` of the replicates, or ``bias_corrected`` (percentile of the replicates shifted
#: by the bootstrap estimate of the bias, for the upward-biased binned calibration errors)
INTERVAL_RULES = ("percentile", "bias_corrected")


def interval(replicates: np.ndarray, level: float, *, rule: str = "percentile", point: float | None = None
             ) -> dict | None:
    """Interval of the defined replicates (None when none is defined): the percentile interval, or with
    ``rule="bias_corrected"`` and a ``point``, the percentile interval of ``reps - (mean(reps) - point)``
    and the estimated ``bias`` (see the module docstring)."""
    reps = np.asarray(replicates, dtype=np.float64)
    ok = reps[np.isfinite(reps)]
    if ok.size == 0:
        return None
    out: dict = {}
    if rule == "bias_corrected" and point is not None and np.isfinite(point):
        bias = float(ok.mean() - point)
        ok = ok - bias
        out["bias"] = bias
    elif rule not in INTERVAL_RULES:
        raise ValueError(f"unknown interval rule {rule!r}")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(ok, [alpha, 1.0 - alpha])
    if "bias" in out:  # a calibration error lies in [0, 1]: the shifted interval is kept inside that range
        low, high = min(max(low, 0.0), 1.0), min(max(high, 0.0), 1.0)
    return {"low": float(low), "high": float(high), "se": float(ok.std(ddof=1)) if ok.size > 1 else None,
            "n_undefined": int(reps.size - ok.size), **out}


def per_resample_loop(preds: Predictions, fn: Callable[[Predictions], dict[str, float | None]],
                      resampling: Resampling) -> dict[str, np.ndarray]:
    """Replicates of a metric without a vectorized form: the metric on each resample in turn
    (slow; used for registered metrics that declare no linear statistics)."""
    out: dict[str, list[float]] = {}
    for counts in resampling.counts():
        for j in range(counts.shape[1]):
            sub = preds.take(resampling.sample_indices(counts[:, j]))
            for key, v in fn(sub).items():
                out.setdefault(key, []).append(np.nan if v is None else float(v))
    return {k: np.asarray(v) for k, v in out.items()}
