"""Graph tokenizer: one token per node, Laplacian-eigenvector positions, edges kept.

GraphMAE (Hou et al., "GraphMAE: Self-Supervised Masked Graph Autoencoders", KDD 2022;
THUDM/GraphMAE) masks node features and reconstructs them; so a node is a token and its feature
vector is the payload. A transformer has no notion of graph structure, so each node also gets the
Laplacian eigenvector positional encoding of Dwivedi et al. ("Benchmarking Graph Neural Networks",
2020; ``AddLaplacianEigenvectorPE`` in PyTorch Geometric): the ``pe_dim`` eigenvectors of the
symmetric normalised Laplacian ``L = I - D^-1/2 A D^-1/2`` with the smallest eigenvalues after the
trivial one. Eigenvectors have no intrinsic sign; we flip each so that its largest-magnitude entry
(first such entry on ties) is positive, which makes the output deterministic (eigenvalue
multiplicities leave a rotation ambiguity that no sign rule removes; both solvers are deterministic
for a given input). Graphs with fewer than ``pe_dim + 1`` nodes get zero columns. Graphs above
``Config.pe_dense_max`` nodes are solved one connected component at a time, large components by
Lanczos with a bounded number of restarts, a shift-invert fallback and deflated re-runs that find
every copy of a repeated eigenvalue: the same eigenvalues as dense eigh, vectors spanning the same
eigenspaces, each zero outside its component (see :func:`laplacian_pe`); a 20,000-node ring takes
~4 s, not minutes. The edges themselves are kept as (E, 2) int32 token-index pairs, in both
directions (graphs are treated as undirected; self loops and duplicate edges are dropped).

A *source* is a whole dataset and ``tokenize`` returns many records:

* **TU folder** (graph classification, e.g. MUTAG): a directory holding ``<NAME>_A.txt``,
  ``<NAME>_graph_indicator.txt``, ``<NAME>_graph_labels.txt`` and optionally
  ``<NAME>_node_labels.txt`` / ``<NAME>_node_attributes.txt`` (directly or in ``raw/``), read with
  numpy with the semantics of ``torch_geometric.io.read_tu_data`` (whose reader cannot read
  one-line or empty files). Every per-node file must have one row per line of the indicator and the
  graph-labels file one row per graph id up to the largest in the indicator (no more, no fewer),
  else the dataset is corrupt. Graph ids need not be dense: an id without nodes gives no record
  (logged), and record ids keep the dataset's numbering (``#<graph id - 1>``, also
  ``meta["graph"]``). One record per graph, labelled
  with its graph label (classes are the sorted distinct values of the labels file; ``label_names``
  are those values as strings, e.g. ``("-1", "1")``). Node features (``Config.tu_features``): ``both`` = node
  attributes followed by the one-hot node labels, ``attributes`` or ``labels`` alone. The one-hot
  width is ``max - min + 1`` of the node-label values over the whole dataset, so it is the same for
  every graph; a width above 10 x the number of distinct values + 1000 is refused (``invalid``:
  relabel them to consecutive integers). A dataset with neither file gets one constant feature
  (1.0) per node.
* **Planetoid folder** (node classification, e.g. Cora): the ``ind.<name>.{x,tx,allx,y,ty,ally,
  graph,test.index}`` files (directly or in ``raw/``), read with
  ``torch_geometric.io.read_planetoid_data``. NB: those files are Python pickles; read only
  trusted ones. One large graph.
* **Edge list** (``.csv`` or ``.edges``): one edge per line, ``src,dst`` or ``src dst`` (0-based
  integer node ids; further columns ignored; a non-numeric first line is a header; ``#``/``%``
  comments). Node features come from the sibling file named by ``Config.node_features``
  (``{stem}.features`` + ``.npy`` or ``.csv``: row i = node i) and labels from
  ``Config.node_labels`` (``{stem}.labels`` + ``.npy``, ``.csv`` or ``.txt``: one integer label
  per node, or ``node,label`` rows; negative = unlabelled; anything else is ``invalid``). Such a
  side file is no edge list itself: read as a source beside its edge list it is ``unsupported``,
  and :meth:`GraphTokenizer.companion_files` names them so that a folder walk
  (``find_inputs(companions=...)``) leaves them out. Without a features file every node gets one
  constant feature. Node ids are row indices: with a features file every id must be one of its
  rows; without one the graph has (largest id + 1) nodes, so an id above 10 x the number of distinct
  ids + 1000 is refused (``invalid``: relabel the nodes to 0..N-1). One large graph.

A large graph (Planetoid, edge list) is cut into k-hop subgraph samples, one per centre node
(``Config.subgraph_centers``: all nodes, or that many evenly spaced node ids): the centre, then
its 1-hop, 2-hop, ... neighbours up to ``subgraph_hops`` hops and ``subgraph_max_nodes`` nodes;
when a hop would overflow the budget, a seeded random subset of it (seed from ``Config.seed`` and
the centre id) fills the rest. The centre is token 0; the record's label is the centre's label and
its meta holds ``center`` (token index, 0), ``center_node`` and ``nodes`` (dataset node ids).
The Laplacian PE is computed on each sample's own graph.

The node-feature width (``token_dim``) depends on the dataset, so ``needs_fit`` is True: ``fit``
reads the sources and records the width and the class names of the first readable one (a source
that cannot be read, or disagrees, is skipped and later an error row: ``config`` for another width
or other class names; with none readable the width is 1), ``save_artifacts`` writes them to
``graph_schema.json`` and ``load_artifacts`` restores them on workers. ``read`` also records them
when nothing is recorded yet (interactive use), and ``Config.feature_dim`` can pin the width.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from maskloom.tokenizers.base import (
    Record,
    TableSpec,
    TokenizeError,
    Tokenizer,
    register_tokenizer,
    report_skipped,
)

log = logging.getLogger(__name__)

SCHEMA_FILE = "graph_schema.json"
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
FEATURE_EXTS = (".npy", ".csv")  # an edge list's node-features file, in order of preference
LABEL_EXTS = (".npy", ".csv", ".txt")  # and its node-labels file


@dataclass
class Graph:
    """One graph.

    x:           (N, F) float32 node features.
    edge_index:  (2, E) int64, both directions, sorted by (source, target), no self loops.
    label:       graph class index (graph classification), or None.
    node_labels: (N,) int64 node class indices (node classification; -1 = unlabelled), or None.
    meta:        where it came from (``graph``: its 0-based id in a TU dataset, which record ids use;
                 for subgraphs the centre and dataset node ids).
    """

    x: np.ndarray
    edge_index: np.ndarray
    label: int | None = None
    node_labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


@dataclass
class GraphDataset:
    """The raw form of one source: many small graphs (``level="graph"``, one record each) or one
    large graph (``level="node"``, one k-hop subgraph record per centre node)."""

    name: str
    level: Literal["graph", "node"]
    graphs: list[Graph]
    label_names: tuple[str, ...] | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.graphs[0].x.shape[1]) if self.graphs else 0


# ---------------------------------------------------------------------------------------------
# structure helpers
# ---------------------------------------------------------------------------------------------
def undirected(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """(2, E) -> (2, E') int64: both directions, no self loops, no duplicates, sorted by (src, dst)."""
    ei = np.asarray(edge_index, np.int64).reshape(2, -1)
    ei = ei[:, ei[0] != ei[1]]
    both = np.concatenate([ei, ei[::-1]], axis=1)
    key = np.unique(both[0] * max(num_nodes, 1) + both[1])
    return np.stack([key // max(num_nodes, 1), key % max(num_nodes, 1)]).astype(np.int64)


def normalized_laplacian(edge_index: np.ndarray, num_nodes: int, *, sparse: bool = False):
    """Symmetric normalised Laplacian ``I - D^-1/2 A D^-1/2`` (N, N) of an undirected graph.

    Isolated nodes have a 1 on the diagonal (their D^-1/2 is taken as 0), as PyG's get_laplacian.
    Dense float64 ndarray, or a scipy CSR matrix with ``sparse``. Duplicate edges count once.
    """
    ei = np.asarray(edge_index, np.int64).reshape(2, -1)
    n = int(num_nodes)
    if not sparse:
        adj = np.zeros((n, n), np.float64)
        adj[ei[0], ei[1]] = 1.0
        deg = adj.sum(axis=1)
        dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
        return np.eye(n) - dinv[:, None] * adj * dinv[None, :]

    adj = sp.csr_matrix((np.ones(ei.shape[1]), (ei[0], ei[1])), shape=(n, n))
    adj.data[:] = 1.0  # duplicates summed by the constructor count once
    deg = np.asarray(adj.sum(axis=1)).ravel()
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    return (sp.identity(n, format="csr") - sp.diags(dinv) @ adj @ sp.diags(dinv)).tocsr()


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry (first within 1e-9 on ties) is positive."""
    if vecs.size == 0:
        return vecs
    mag = np.abs(vecs)
    first = np.argmax(mag >= mag.max(axis=0, keepdims=True) - 1e-9, axis=0)  # (k,)
    signs = np.sign(vecs[first, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vecs * signs


LANCZOS_WORK = 1e7
"""Restart budget of one sparse Lanczos run, in restarts x nodes (2-4 s on one core)."""
LANCZOS_MIN_RESTARTS = 100
"""... and at least this many restarts (a well-connected graph needs fewer than 100)."""
SHIFT = 1e-9
"""Shift-invert fallback: Lanczos on ``(L + SHIFT I)^-1``, from a sparse LU of ``L + SHIFT I``."""
EIG_TOL = 1e-10
"""Eigenvalues this close count as equal: ties across components (up to this much above the
smallest of a tie group), and the check that a verification run found nothing below the
eigenvalues already found."""
RESIDUAL_TOL = 1e-6
"""Largest accepted residual ``||L v - lambda v||`` of a sparse eigenpair (it bounds the eigenvalue
error)."""
SPARSE_MIN_NODES = 100
"""A component this small (or below 6 x the eigenpairs it must give) is solved dense whatever
``dense_max``: an iterative solve needs room beyond the pairs it is asked for."""


class PEConvergenceError(RuntimeError):
    """The sparse eigensolver did not find the Laplacian PE of a graph."""


def _shift_invert_solver(lap):
    """``b -> (L + SHIFT I)^-1 b`` for the sparse symmetric PSD ``lap`` of a connected component.
    Graphs with a small spectral gap (long rings, paths, chains) have small separators, so the LU
    (minimum degree ordering of A + A^T) stays sparse; expanders, whose LU fills in, converge without
    it. Raises :class:`PEConvergenceError` when the factorisation fails."""
    from scipy.sparse.linalg import splu

    n = lap.shape[0]
    try:
        lu = splu((lap + SHIFT * sp.identity(n, format="csr")).tocsc(), permc_spec="MMD_AT_PLUS_A")
    except (RuntimeError, MemoryError) as e:
        raise PEConvergenceError(
            f"the sparse eigensolver found no Laplacian positional encoding for this {n}-node graph "
            f"(shift-invert LU: {type(e).__name__}: {e})"
        ) from None
    return lu.solve


def _component_eigenpairs(lap, null: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``q`` smallest eigenpairs of the Laplacian ``lap`` (sparse, s x s) of a connected graph
    besides its null vector ``null`` (``D^1/2 1``, normalised): ascending (q,) eigenvalues and
    (s, q) orthonormal eigenvectors, eigenvalue multiplicities included.

    Lanczos (``eigsh``) with one start vector finds one vector per eigenspace: in exact arithmetic
    its Krylov space holds only the start vector's projection on each. So it is run again, on the
    operator deflated of every eigenvector found so far (``P A P``, ``P = I - F F^T``), from a fresh
    deterministic start: the deflated operator's smallest eigenvalues are exactly those not found yet,
    including further copies of repeated ones. A run that finds nothing below the q-th smallest
    eigenvalue found (within ``EIG_TOL``) proves the set complete; at most ``q + 2`` runs. Each run is
    Lanczos on ``2I - L`` within the restart budget, or, once that runs out (tiny spectral gaps),
    Lanczos on ``(L + SHIFT I)^-1`` from one sparse LU. A final Rayleigh-Ritz on all vectors found
    orders them, and every residual is checked (``RESIDUAL_TOL``). Raises :class:`PEConvergenceError`.
    """
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    s = lap.shape[0]
    restarts = max(LANCZOS_MIN_RESTARTS, int(LANCZOS_WORK // s))
    basis = null.reshape(s, 1)  # orthonormal: every direction deflated so far
    vecs = np.zeros((s, 0))  # eigenvectors found (besides the null vector)
    vals = np.zeros(0)
    solve = None  # (L + SHIFT I)^-1, once Lanczos on 2I - L has run out of restarts
    complete = False

    def fail(why: str) -> PEConvergenceError:
        return PEConvergenceError(
            f"the sparse eigensolver found no Laplacian positional encoding for this {s}-node graph ({why})"
        )

    def deflated(apply, f: np.ndarray) -> LinearOperator:
        """``P A P`` for ``P = I - f f^T``, as ``P A``: ARPACK applies it to vectors of P's range
        only (v0 and its outputs); the P also wipes what rounding adds along f."""

        def matvec(v):
            out = apply(v)
            return out - f @ (f.T @ out)

        return LinearOperator((s, s), matvec=matvec, dtype=np.float64)

    for run in range(q + 2):
        want = min(q, s - basis.shape[1] - 1)
        if want <= 0:  # every direction is found
            complete = True
            break
        v0 = np.random.default_rng([0, run]).uniform(0.5, 1.5, s)
        v0 -= basis @ (basis.T @ v0)
        while True:
            # smallest eigenvalues of L: the largest of 2I - L (spectrum in [0, 2]) or of the inverse
            op = deflated(lambda v: 2.0 * v - lap @ v, basis) if solve is None else deflated(solve, basis)
            try:
                _, v = eigsh(op, k=want, which="LA", v0=v0, tol=1e-8, maxiter=restarts)
                break
            except ArpackNoConvergence:
                if solve is not None:
                    raise fail(f"shift-invert Lanczos did not converge in {restarts} restarts") from None
                solve = _shift_invert_solver(lap)
            except ArpackError as e:
                raise fail(f"{type(e).__name__}: {e}") from None
        v -= basis @ (basis.T @ v)  # clean off rounding along the deflated directions
        w = np.einsum("ij,ij->j", v, lap @ v) / np.einsum("ij,ij->j", v, v)  # Rayleigh quotients
        if run > 0 and vals.size >= q:
            bound = np.sort(vals)[q - 1]
            if w.min() >= bound - EIG_TOL:  # nothing below what was found: the set is complete
                complete = True
                break
        vecs = np.concatenate([vecs, v], axis=1)
        vals = np.concatenate([vals, w])
        basis, _ = np.linalg.qr(np.concatenate([basis, v], axis=1))
    if not complete:
        raise fail(f"more repeated eigenvalues than {q + 2} Lanczos runs resolve")
    # Rayleigh-Ritz on everything found: orthonormal, ascending, and the residuals to check
    f, _ = np.linalg.qr(vecs - null[:, None] @ (null[None, :] @ vecs))
    theta, y = scipy.linalg.eigh(f.T @ (lap @ f))
    x = f @ y[:, :q]
    theta = theta[:q]
    res = np.linalg.norm(lap @ x - x * theta, axis=0).max(initial=0.0)
    if not res <= RESIDUAL_TOL:
        raise fail(f"residual {res:.1e} above {RESIDUAL_TOL:g}")
    return theta, x


def _sparse_pe(edge_index: np.ndarray, n: int, m: int, dense_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs 1..m (0 skipped) of the normalised Laplacian of an ``n``-node graph, component by
    component: (m,) eigenvalues and (n, m) eigenvectors, each vector zero outside its component.

    A graph's spectrum is the union of its connected components'. Every component with an edge has
    the eigenvalue 0 once, vector ``D^1/2 1`` (normalised) on its nodes, taken exactly; an isolated
    node has 1, vector e_i; a component's other eigenpairs come from dense ``eigh`` (up to
    ``dense_max`` nodes, and below ``SPARSE_MIN_NODES`` or 6 x the pairs it must give) or from
    :func:`_component_eigenpairs`. Only pairs that can be among the graph's m + 1 smallest are
    computed (the nulls come first: with m + 1 components with edges nothing else is).

    Merged order (deterministic): the nulls first, in component order; then ascending eigenvalue,
    where eigenvalues up to ``EIG_TOL`` above the smallest of their group count as tied and a tie is
    ordered by component, then as within it. Components are ordered by their smallest node id. The
    first pair is skipped as the dense path skips the trivial one: the null of the first component
    with an edge (the one holding node 0 unless node 0 is isolated), or the first isolated node's
    when there is no edge.
    """
    from scipy.sparse.csgraph import connected_components

    ei = np.asarray(edge_index, np.int64).reshape(2, -1)
    adj = sp.csr_matrix((np.ones(ei.shape[1]), (ei[0], ei[1])), shape=(n, n))
    adj.data[:] = 1.0  # as normalized_laplacian: duplicate edges count once
    deg = np.asarray(adj.sum(axis=1)).ravel()
    lap = normalized_laplacian(ei, n, sparse=True)
    ncomp, labels = connected_components(adj, directed=False)
    by_comp = np.argsort(labels, kind="stable")  # nodes grouped by component, ascending inside
    starts = np.searchsorted(labels[by_comp], np.arange(ncomp + 1))
    first = by_comp[starts[:-1]]  # smallest node id of each component
    sizes = np.diff(starts)
    ranked = np.argsort(first, kind="stable")  # components in order of their smallest node
    edged = ranked[sizes[ranked] > 1]
    need = m + 1  # pairs wanted, the skipped one included
    q_max = max(need - edged.size, 0)  # pairs above its null a component can contribute at most
    # only the first m + 1 components with edges (their nulls rank first) and the first m + 1
    # isolated nodes (eigenvalue 1, tied with each other) can be among the m + 1 smallest
    keep = np.concatenate([edged[:need], ranked[sizes[ranked] == 1][:need]])
    keep = keep[np.argsort(first[keep], kind="stable")]
    vals: list[float] = []  # candidate pairs: eigenvalue,
    rank: list[int] = []  # the component's smallest node id,
    within: list[int] = []  # the pair's number in its component (0 = null or isolated node),
    null: list[bool] = []  # whether it is an exact null,
    nodes: list[np.ndarray] = []  # the component's nodes
    vecs: list[np.ndarray] = []  # and the eigenvector on them
    for c in keep.tolist():
        on = by_comp[starts[c] : starts[c + 1]]
        size = int(sizes[c])
        w, v = np.ones(1), np.ones((1, 1))  # an isolated node
        if size > 1:
            y = np.sqrt(deg[on])
            w, v = np.zeros(1), (y / np.linalg.norm(y))[:, None]
            q = min(q_max, size - 1)
            if q > 0:
                sub = lap[on][:, on]
                if size <= max(dense_max, SPARSE_MIN_NODES, 6 * (q + 1)):
                    wq, vq = scipy.linalg.eigh(sub.toarray(), subset_by_index=[0, q])
                    wq, vq = wq[1:], vq[:, 1:]
                else:
                    wq, vq = _component_eigenpairs(sub.tocsr(), v[:, 0], q)
                w, v = np.concatenate([w, wq]), np.concatenate([v, vq], axis=1)
        for j in range(w.size):
            vals.append(float(w[j]))
            rank.append(int(first[c]))
            within.append(j)
            null.append(size > 1 and j == 0)
            nodes.append(on)
            vecs.append(v[:, j])
    # tie groups, not chained: a group holds the eigenvalues up to EIG_TOL above its smallest
    tie = np.full(len(vals), -1, np.int64)  # the nulls: group -1
    group, start = -1, -np.inf
    for i in np.lexsort((within, rank, vals)).tolist():
        if not null[i]:
            if vals[i] > start + EIG_TOL:
                group, start = group + 1, vals[i]
            tie[i] = group
    chosen = np.lexsort((within, rank, tie))[1 : m + 1].tolist()
    v = np.zeros((n, m))
    for j, i in enumerate(chosen):
        v[nodes[i], j] = vecs[i]
    return np.array([vals[i] for i in chosen]), v


def laplacian_pe(
    edge_index: np.ndarray, num_nodes: int, k: int, *, dense_max: int = 2000, return_eigenvalues: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Laplacian eigenvector positional encoding: (N, k) float32.

    Eigenvectors 1..k (ascending eigenvalue; number 0, the trivial one, skipped) of the symmetric
    normalised Laplacian of the undirected graph ``edge_index`` (2, E); sign-fixed so each column's
    largest-magnitude entry is positive; zero columns when the graph has fewer than k + 1 nodes.
    Dense ``eigh`` up to ``dense_max`` nodes (and when k + 1 >= N). Beyond, :func:`_sparse_pe`
    takes the graph's connected components one by one: exact null vectors (``D^1/2 1`` on a
    component) and isolated nodes (eigenvalue 1), ``eigh`` for small components and
    :func:`_component_eigenpairs` for large ones: Lanczos (``eigsh``, deterministic starts) within a
    restart budget of ``max(LANCZOS_MIN_RESTARTS, LANCZOS_WORK / component size)``, shift-invert
    from a sparse LU when that runs out (long rings, paths, chains), re-run deflated of the vectors
    found until a run finds nothing missed (2 or 3 runs, at most k + 2), residuals checked. So the eigenvalues are dense ``eigh``'s, a repeated one
    (grids, symmetric graphs, the 0 of each component) with all its eigenvectors, and the vectors
    span the same eigenspaces. Within a repeated eigenvalue's eigenspace the basis differs from
    ``eigh``'s (which is arbitrary too): each sparse vector lies in one component, ties across
    components are ordered by component (smallest node id first), and the skipped trivial vector is
    the null of the first component with an edge.
    With ``return_eigenvalues`` also the (k,) eigenvalues (0 for padded columns). Raises
    :class:`PEConvergenceError` when the sparse solver does not converge.
    """
    n = int(num_nodes)
    pe = np.zeros((n, k), np.float64)
    vals = np.zeros(k, np.float64)
    m = min(k, max(n - 1, 0))  # non-trivial eigenvectors available
    if m > 0:
        if n <= dense_max or m + 1 >= n:  # (eigsh needs k < N)
            # scipy, asking only for the m + 1 smallest pairs: ~7x faster than the full spectrum and
            # much faster than numpy's threaded OpenBLAS on many small matrices
            w, v = scipy.linalg.eigh(normalized_laplacian(edge_index, n), subset_by_index=[0, m])
            w, v = w[1 : m + 1], v[:, 1 : m + 1]
        else:
            from threadpoolctl import threadpool_limits

            # one BLAS thread: Lanczos makes thousands of small BLAS calls (the deflated matvec),
            # and a threaded BLAS wakes its pool for each: a 20,000-node ring took 32-51 s on two
            # busy cores instead of 4.8 s
            with threadpool_limits(limits=1, user_api="blas"):
                w, v = _sparse_pe(edge_index, n, m, dense_max)
        pe[:, :m] = _fix_signs(v)
        vals[:m] = w
    pe32 = pe.astype(np.float32)
    return (pe32, vals) if return_eigenvalues else pe32


def k_hop_nodes(adj, center: int, hops: int, max_nodes: int, rng: np.random.Generator) -> np.ndarray:
    """Dataset node ids of the k-hop neighbourhood of ``center`` in CSR adjacency ``adj``:
    the centre first, then each hop in ascending id order; at most ``max_nodes`` nodes (a hop that
    would overflow the budget is subsampled with ``rng``)."""
    nodes = [np.array([center], np.int64)]
    seen = np.zeros(adj.shape[0], bool)
    seen[center] = True
    frontier = nodes[0]
    count = 1
    for _ in range(hops):
        if count >= max_nodes or frontier.size == 0:
            break
        nbrs = np.unique(adj[frontier].indices)
        new = nbrs[~seen[nbrs]]
        if new.size == 0:
            break
        room = max_nodes - count
        if new.size > room:
            new = np.sort(rng.choice(new, size=room, replace=False))
        seen[new] = True
        nodes.append(new.astype(np.int64))
        count += new.size
        frontier = new
    return np.concatenate(nodes)


def induced_subgraph(adj, nodes: np.ndarray) -> np.ndarray:
    """(2, E) int64 edges among ``nodes`` (relabelled 0..len(nodes)-1 in the given order), sorted."""
    sub = adj[nodes][:, nodes].tocoo()
    ei = np.stack([sub.row, sub.col]).astype(np.int64)
    return undirected(ei, len(nodes))


# ---------------------------------------------------------------------------------------------
# file readers
# ---------------------------------------------------------------------------------------------
def _read_numeric_rows(path: str) -> np.ndarray:
    """A small numeric text table (whitespace/comma separated, optional header, #/% comments) as
    float64 (R, C). Raises TokenizeError(corrupt/empty)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            rows = [ln.split("#", 1)[0].split("%", 1)[0].replace(",", " ").split() for ln in f]
    except UnicodeDecodeError as e:
        raise TokenizeError(path, "corrupt", f"not a text file ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a side file (features, labels) is not checked by check_file
        kind = "missing" if isinstance(e, FileNotFoundError) else "unreadable"
        raise TokenizeError(path, kind, f"cannot open ({e.strerror})") from None
    rows = [r for r in rows if r]
    if rows:
        try:
            [float(v) for v in rows[0]]
        except ValueError:
            rows = rows[1:]  # a header line
    if not rows:
        raise TokenizeError(path, "empty", "no data rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise TokenizeError(path, "corrupt", f"rows have different numbers of values: {sorted(widths)[:5]}")
    try:
        return np.asarray(rows, dtype=np.float64)
    except ValueError as e:
        raise TokenizeError(path, "corrupt", f"non-numeric value: {e}") from None


def _read_tu_file(path: str, dtype: type, source: str) -> np.ndarray:
    """One TU text file (comma-separated values, one row per line; blank lines ignored) as (R, C)
    ``dtype``; an empty file gives (0, 0). numpy rather than ``torch_geometric.io.read_txt_array``,
    which squeezes a one-line file to 1-D (or 0-D) and so cannot read a single graph, a single edge
    or an empty edge file. Raises TokenizeError(source, corrupt) naming the file."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip()]
    except UnicodeDecodeError as e:
        raise TokenizeError(
            source, "corrupt", f"{name}: not a text file ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise TokenizeError(source, "missing", f"{name}: cannot open ({e.strerror})") from None
    if not lines:
        return np.zeros((0, 0), dtype)
    try:
        return np.loadtxt(lines, dtype=dtype, delimiter=",", ndmin=2, comments=None)
    except (ValueError, OverflowError) as e:
        what = "integers" if np.issubdtype(dtype, np.integer) else "numbers"
        raise TokenizeError(source, "corrupt", f"{name}: expected comma-separated {what} ({e})") from None


def _too_sparse(needed: int, values: np.ndarray) -> int:
    """The number of distinct ``values`` when the ``needed`` rows or classes they would index (a
    one-hot's width, the node ids' range) exceed 10 x that + 1000, mostly empty; else 0."""
    distinct = int(np.unique(values).size)
    return distinct if needed > 10 * distinct + 1000 else 0


def _first_non_integer(a: np.ndarray) -> str:
    """The first value of float array ``a`` that is not an exact integer below 2**53, as text."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(a) | (a != np.round(a)) | (np.abs(a) >= 2**53)
    return f"{float(a[np.argmax(bad)]):g}"


def _sibling(source: str, pattern: str, exts: tuple[str, ...]) -> str | None:
    directory, base = os.path.split(source)
    stem = os.path.splitext(base)[0]
    for ext in exts:
        p = os.path.join(directory, pattern.format(stem=stem) + ext)
        if os.path.isfile(p):
            return p
    return None


def _find(directory: str, pattern: str) -> list[str]:
    hits = []
    for d in (directory, os.path.join(directory, "raw")):
        hits += sorted(glob.glob(os.path.join(glob.escape(d), pattern)))
    return hits


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------
@register_tokenizer("graph")
class GraphTokenizer(Tokenizer):
    """Graphs -> node tokens with Laplacian PE positions and edges (GraphMAE)."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        pe_dim: int = 8
        """Laplacian eigenvectors per node (position axes lap0..lap{pe_dim-1})."""
        tu_features: Literal["both", "attributes", "labels"] = "both"
        """TU node features: attributes then one-hot node labels, or only one of them."""
        node_features: str = "{stem}.features"
        """Edge lists: node-feature file beside the edge list, without extension (.npy or .csv)."""
        node_labels: str = "{stem}.labels"
        """Edge lists: node-label file beside the edge list, without extension (.npy, .csv, .txt)."""
        subgraph_hops: int = 2
        """Large graphs: hops around each centre node in a subgraph sample."""
        subgraph_max_nodes: int = 128
        """Large graphs: node budget of a subgraph sample (centre included)."""
        subgraph_centers: int = 0
        """Large graphs: 0 = one sample per node; k > 0 = k evenly spaced centre node ids."""
        feature_dim: int | None = None
        """Pin the node-feature width; None = learned by fit() (or the first read())."""
        pe_dense_max: int = 2000
        """Graphs up to this many nodes use dense eigh for the PE; larger ones are split into their
        connected components, each solved dense up to this many nodes, else sparse (eigsh)."""
        seed: int = 0
        """Seed of the subgraph budget subsampling."""

        def __post_init__(self) -> None:
            if self.pe_dim < 1:
                raise ValueError(f"pe_dim must be >= 1, got {self.pe_dim}")
            if self.tu_features not in ("both", "attributes", "labels"):
                raise ValueError(f"tu_features must be both, attributes or labels, got {self.tu_features!r}")
            if self.subgraph_hops < 0 or self.subgraph_max_nodes < 1 or self.subgraph_centers < 0:
                raise ValueError(
                    "subgraph_hops >= 0, subgraph_max_nodes >= 1 and subgraph_centers >= 0 required"
                )
            if self.feature_dim is not None and self.feature_dim < 1:
                raise ValueError(f"feature_dim must be >= 1, got {self.feature_dim}")
            for name in ("node_features", "node_labels"):
                if "{stem}" not in getattr(self, name):
                    raise ValueError(f"{name} must contain '{{stem}}', got {getattr(self, name)!r}")
                try:
                    getattr(self, name).format(stem="x")
                except (KeyError, IndexError, ValueError):
                    raise ValueError(
                        f"{name} may hold no other {{...}} field than {{stem}}, got {getattr(self, name)!r}"
                    ) from None

    # 2: PE of large graphs with clustered small eigenvalues by shift-invert
    # 3: PE of graphs above pe_dense_max per connected component, with every copy of a repeated
    #    eigenvalue (grids, disconnected graphs' 0): their positions changed
    version = "3"
    extensions = (".csv", ".edges")
    folder_source = "a TU dataset folder"
    needs_fit = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._feature_dim: int | None = self.config.feature_dim
        self._label_names: tuple[str, ...] | None = None

    # ---- schema state (fit / artifacts) -------------------------------------------------------
    @property
    def feature_dim(self) -> int | None:
        """Node-feature width once known (config, fit, artifacts or a first read)."""
        return self._feature_dim

    def spec(self) -> TableSpec:
        if self._feature_dim is None:
            raise RuntimeError(
                "graph tokenizer: the node-feature width is not known yet; call fit(sources) or "
                "load_artifacts(dir) first, or set Config.feature_dim"
            )
        return TableSpec(
            modality=self.name,
            token_kind="continuous",
            token_dim=self._feature_dim,
            token_dtype="float32",
            position_axes=tuple(f"lap{i}" for i in range(self.config.pe_dim)),
            position_kind="spectral",
        )

    def label_names(self) -> tuple[str, ...] | None:
        return self._label_names

    def fit(self, sources: Iterable[str]) -> None:
        """Read every source and record the node-feature width and class names.

        The first source that can be read (in the given order; the pipeline sorts them) sets them;
        a later source that disagrees (another width, other class names) or cannot be read at all
        is skipped with a warning, and the pipeline records its TokenizeError (``config`` for a
        disagreement) as an error row when it reads it again. When no source can be read the width
        is set to 1 (and no class names), so that the job can still run and record every source's
        error; a width pinned by ``Config.feature_dim`` is kept."""
        skipped: list[TokenizeError] = []
        for src in sources:
            try:
                self.read(src)  # read() records the width and class names, or checks them
            except TokenizeError as e:
                skipped.append(e)
        if skipped:
            log.warning("graph fit skipped %d source(s), e.g. %s", len(skipped), skipped[0])
        if self._feature_dim is None:
            log.warning("graph fit: no source could be read; recording a node-feature width of 1")
            self._feature_dim = 1

    def _adopt(self, ds: GraphDataset, source: str) -> None:
        """Record the dataset's width and class names when unknown, else check it agrees with them
        (TokenizeError ``config``); nothing is recorded when it does not agree."""
        if self._feature_dim is not None and ds.feature_dim != self._feature_dim:
            raise TokenizeError(
                source,
                "config",
                f"node features are {ds.feature_dim} wide but this tokenizer was fitted for {self._feature_dim}"
                " (a table holds one width: tokenize such datasets into tables of their own)",
            )
        names = ds.label_names
        if names is not None and self._label_names is not None and self._label_names != names:
            raise TokenizeError(
                source,
                "config",
                f"class names {list(names)} differ from the fitted {list(self._label_names)}"
                " (a table holds one set: tokenize such datasets into tables of their own)",
            )
        if self._feature_dim is None:
            self._feature_dim = ds.feature_dim
        if names is not None and self._label_names is None:
            self._label_names = names

    def save_artifacts(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        state = {
            "feature_dim": self._feature_dim,
            "label_names": list(self._label_names) if self._label_names else None,
        }
        with open(os.path.join(directory, SCHEMA_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
        return [SCHEMA_FILE]

    def load_artifacts(self, directory: str) -> None:
        path = os.path.join(directory, SCHEMA_FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if self.config.feature_dim is not None and state.get("feature_dim") not in (
            None,
            self.config.feature_dim,
        ):
            raise ValueError(
                f"{path}: feature_dim {state['feature_dim']} disagrees with config {self.config.feature_dim}"
            )
        self._feature_dim = state.get("feature_dim") if self._feature_dim is None else self._feature_dim
        names = state.get("label_names")
        self._label_names = tuple(names) if names is not None else None

    # ---- read ---------------------------------------------------------------------------------
    def read(self, source: str) -> GraphDataset:
        """Read a TU folder, a Planetoid folder or an edge-list file into a GraphDataset."""
        self.check_file(source)
        if os.path.isdir(source):
            tu = _find(source, "*_A.txt")
            planetoid = [p for p in _find(source, "ind.*.graph")]
            if len(tu) > 1 or len(planetoid) > 1 or (tu and planetoid):
                raise TokenizeError(
                    source, "unsupported", "holds several datasets; point at one dataset's folder"
                )
            if tu:
                ds = self._read_tu(source, tu[0])
            elif planetoid:
                ds = self._read_planetoid(source, planetoid[0])
            else:
                raise TokenizeError(
                    source,
                    "unsupported",
                    "no TU (<NAME>_A.txt) or Planetoid (ind.<name>.graph) files in it or in raw/",
                )
        else:
            ext = os.path.splitext(source)[1].lower()
            if ext not in self.extensions:
                raise TokenizeError(
                    source, "unsupported", f"expected a dataset folder or an edge list {self.extensions}"
                )
            owner = self._companion_owner(source)
            if owner is not None:
                raise TokenizeError(
                    source,
                    "unsupported",
                    f"is the node-{owner[1]} file of the edge list {owner[0]} (Config.node_{owner[1]}), "
                    "read with it; it is not an edge list",
                )
            ds = self._read_edge_list(source)
        if not any(g.num_nodes for g in ds.graphs):
            raise TokenizeError(source, "empty", "the dataset has no nodes")
        # record the width / class names when unknown; otherwise check this dataset agrees with them
        self._adopt(ds, source)
        return ds

    def _side_files(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """(what, name pattern, extensions) of an edge list's node-features and node-labels files."""
        return (
            ("features", self.config.node_features, FEATURE_EXTS),
            ("labels", self.config.node_labels, LABEL_EXTS),
        )

    def companion_files(self, source: str) -> tuple[str, ...]:
        """Every name the node-features and node-labels files of edge list ``source`` may have
        (``Config.node_features`` / ``node_labels`` with each extension), whether or not they
        exist: a folder walk does not take them as edge lists of their own. () for other sources."""
        if os.path.splitext(source)[1].lower() not in self.extensions:
            return ()
        directory, base = os.path.split(source)
        stem = os.path.splitext(base)[0]
        return tuple(
            os.path.join(directory, pattern.format(stem=stem) + ext)
            for _, pattern, exts in self._side_files()
            for ext in exts
        )

    def _companion_owner(self, source: str) -> tuple[str, str] | None:
        """(edge list, "features" or "labels") when file ``source`` is one of the
        :meth:`companion_files` of an edge list that exists, else None. Patterns that climb
        (``..``) or are absolute are not inverted."""
        path = os.path.normpath(source)
        for what, pattern, exts in self._side_files():
            pat = os.path.normpath(pattern)
            if os.path.isabs(pat) or ".." in pat.split(os.sep):
                continue
            head, *rest = pat.split("{stem}")
            stem_rx = f"{re.escape(head)}(?P<stem>[^{re.escape(os.sep)}]+)"
            body = stem_rx + re.escape(rest[0]) + "".join("(?P=stem)" + re.escape(r) for r in rest[1:])
            for ext in exts:
                m = re.search(f"(?:^|{re.escape(os.sep)}){body}{re.escape(ext)}$", path)
                if m is None:
                    continue
                directory = path[: m.start()] or ("" if not path.startswith(os.sep) else os.sep)
                for edge_ext in self.extensions:
                    for e in dict.fromkeys((edge_ext, edge_ext.upper())):
                        owner = os.path.join(directory, m.group("stem") + e)
                        if os.path.isfile(owner) and os.path.normpath(owner) != path:
                            return owner, what
        return None

    def _read_tu(self, source: str, a_path: str) -> GraphDataset:
        folder = os.path.dirname(a_path)
        prefix = os.path.basename(a_path)[: -len("_A.txt")]

        def path(name: str) -> str:
            return os.path.join(folder, f"{prefix}_{name}.txt")

        def fail(name: str, reason: str, kind: str = "corrupt") -> TokenizeError:
            return TokenizeError(source, kind, f"TU dataset {prefix}: {prefix}_{name}.txt {reason}")

        if not os.path.exists(path("graph_indicator")):
            raise TokenizeError(source, "corrupt", f"TU dataset {prefix} has no {prefix}_graph_indicator.txt")
        a = _read_tu_file(path("A"), np.int64, source)
        if a.shape[0] and a.shape[1] != 2:
            raise fail("A", f"has {a.shape[1]} value(s) per line; an edge is 'source, target'")
        a = a.reshape(-1, 2)  # (E, 2); an empty file (isolated nodes only) is (0, 2)
        batch = _read_tu_file(path("graph_indicator"), np.int64, source)
        if batch.shape[0] == 0:
            raise fail("graph_indicator", "lists no nodes", kind="empty")
        if batch.shape[1] != 1:
            raise fail("graph_indicator", f"has {batch.shape[1]} values per line; expected one graph id")
        batch = batch[:, 0] - 1  # (N,) 0-based graph id of each node
        n = int(batch.size)
        if batch.min() < 0:
            raise fail("graph_indicator", "has a graph id < 1: graph ids start at 1")
        if (np.diff(batch) < 0).any():
            raise fail("graph_indicator", "is not sorted: the nodes of a graph must be consecutive")
        per_node: dict[str, np.ndarray] = {}
        for name, dtype in (("node_attributes", np.float64), ("node_labels", np.int64)):
            if os.path.exists(path(name)):
                per_node[name] = _read_tu_file(path(name), dtype, source)
                rows = per_node[name].shape[0]
                if rows != n:
                    raise fail(name, f"has {rows} rows but {prefix}_graph_indicator.txt lists {n} nodes")
        raw_labels = None
        if os.path.exists(path("graph_labels")):
            raw_labels = _read_tu_file(path("graph_labels"), np.int64, source)
            if raw_labels.shape[0] and raw_labels.shape[1] != 1:
                raise fail("graph_labels", f"has {raw_labels.shape[1]} values per line; expected one label")
            raw_labels = raw_labels.reshape(-1)
            if raw_labels.size != int(batch[-1]) + 1:  # rows beyond the last graph belong to none
                raise fail(
                    "graph_labels",
                    f"has {raw_labels.size} rows but {prefix}_graph_indicator.txt names "
                    f"{int(batch[-1]) + 1} graphs",
                )
        # (2, E) 0-based global node ids; every edge must join two nodes of the same graph
        ei = a.T - 1
        bad = ei[(ei < 0) | (ei >= n)]
        if bad.size:
            raise fail("A", f"names node {int(bad[0]) + 1}; the indicator lists nodes 1..{n}")
        if (batch[ei[0]] != batch[ei[1]]).any():
            raise fail("A", "has an edge between nodes of different graphs")
        # only the graph ids that have nodes become graphs: ids are not necessarily dense
        gids, starts, counts = np.unique(batch, return_index=True, return_counts=True)
        if gids.size < int(batch[-1]) + 1:
            log.warning(
                "%s: TU dataset %s: %d of the graph ids 1..%d have no nodes in %s_graph_indicator.txt; "
                "they give no records",
                source,
                prefix,
                int(batch[-1]) + 1 - gids.size,
                int(batch[-1]) + 1,
                prefix,
            )
        node_graph = np.repeat(np.arange(gids.size), counts)  # (N,) position of each node's graph in gids
        edge_graph = node_graph[ei[0]]
        order = np.argsort(edge_graph, kind="stable")
        ei = ei[:, order] - starts[edge_graph[order]]  # (2, E) node ids local to their graph
        edge_slice = np.searchsorted(edge_graph[order], np.arange(gids.size + 1))
        x_all = self._tu_features(source, prefix, per_node, n)
        names = None
        y = None
        if raw_labels is not None:
            classes, y = np.unique(raw_labels, return_inverse=True)
            names = tuple(str(int(c)) for c in classes)
        graphs = []
        for j, gid in enumerate(gids.tolist()):  # a loop over graphs, not tokens
            a, b = int(starts[j]), int(starts[j] + counts[j])
            graphs.append(
                Graph(
                    x=x_all[a:b],
                    edge_index=undirected(ei[:, edge_slice[j] : edge_slice[j + 1]], b - a),
                    label=None if y is None else int(y[gid]),
                    meta={"graph": gid},
                )
            )
        return GraphDataset(name=prefix, level="graph", graphs=graphs, label_names=names)

    def _tu_features(self, source: str, prefix: str, per_node: dict[str, np.ndarray], n: int) -> np.ndarray:
        """(N, F) float32 node features from the TU per-node files: the attributes, then each
        node-label column one-hot over ``max - min + 1`` classes (as ``read_tu_data`` builds them).
        A column whose span is more than 10 x its distinct values + 1000 is refused (``invalid``)
        rather than one-hot encoded into mostly empty columns."""
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
            attrs = per_node.get("node_attributes", np.zeros((n, 0))).astype(np.float32)
        if not np.isfinite(attrs).all():
            raise TokenizeError(
                source, "invalid", "TU node attributes contain NaN or inf (or overflow float32)"
            )
        onehots = []
        for col in per_node.get("node_labels", np.zeros((n, 0), np.int64)).T:
            lo, hi = int(col.min()), int(col.max())  # Python ints: the span may overflow int64
            width = hi - lo + 1
            distinct = _too_sparse(width, col)
            if distinct:
                raise TokenizeError(
                    source,
                    "invalid",
                    f"TU dataset {prefix}: {prefix}_node_labels.txt has node labels from {lo} to {hi} "
                    f"but only {distinct} distinct values: a one-hot over {width} classes; relabel "
                    "them to consecutive integers",
                )
            onehot = np.zeros((n, width), np.float32)
            onehot[np.arange(n), col - lo] = 1.0
            onehots.append(onehot)
        labels = np.concatenate(onehots, axis=1) if onehots else np.zeros((n, 0), np.float32)
        if attrs.shape[1] + labels.shape[1] == 0:
            if self.config.tu_features != "both":
                raise TokenizeError(
                    source,
                    "config",
                    f"tu_features={self.config.tu_features!r} but the dataset has no node {self.config.tu_features}",
                )
            log.info("%s: no node attributes or labels; using one constant feature per node", source)
            return np.ones((n, 1), np.float32)
        x = {
            "both": lambda: np.concatenate([attrs, labels], axis=1),
            "attributes": lambda: attrs,
            "labels": lambda: labels,
        }[self.config.tu_features]()
        if x.shape[1] == 0:
            raise TokenizeError(
                source,
                "config",
                f"tu_features={self.config.tu_features!r} but the dataset has no node {self.config.tu_features}",
            )
        return np.ascontiguousarray(x)

    def _read_planetoid(self, source: str, graph_path: str) -> GraphDataset:
        from torch_geometric.io import read_planetoid_data

        folder = os.path.dirname(graph_path)
        prefix = os.path.basename(graph_path)[len("ind.") : -len(".graph")]
        missing = [
            f for f in PLANETOID_FILES if not os.path.exists(os.path.join(folder, f"ind.{prefix}.{f}"))
        ]
        if missing:
            raise TokenizeError(
                source, "corrupt", f"Planetoid dataset {prefix} lacks ind.{prefix}.{{{','.join(missing)}}}"
            )
        try:
            data = read_planetoid_data(folder, prefix)
        except Exception as e:
            raise TokenizeError(
                source, "corrupt", f"cannot read Planetoid dataset {prefix}: {type(e).__name__}: {e}"
            ) from None
        x = data.x.numpy().astype(np.float32)
        y = data.y.numpy().astype(np.int64)
        n = x.shape[0]
        k = int(y.max()) + 1 if y.size else 0
        g = Graph(
            x=x, edge_index=undirected(data.edge_index.numpy(), n), node_labels=y, meta={"dataset": prefix}
        )
        return GraphDataset(
            name=prefix, level="node", graphs=[g], label_names=tuple(str(i) for i in range(k))
        )

    def _read_edge_list(self, source: str) -> GraphDataset:
        rows = _read_numeric_rows(source)
        if rows.shape[1] < 2:
            raise TokenizeError(
                source, "corrupt", f"an edge needs two node ids per line, got {rows.shape[1]} value(s)"
            )
        ei = rows[:, :2].T
        if not np.isfinite(ei).all() or (ei != np.round(ei)).any() or (ei < 0).any():
            raise TokenizeError(source, "invalid", "node ids must be non-negative integers")
        if ei.size and ei.max() >= 2**53:  # beyond exact float64 integers (and near int64 overflow)
            raise TokenizeError(source, "invalid", f"node id {ei.max():.6g} is too large; relabel the nodes")
        ei = ei.astype(np.int64)
        feat_path = _sibling(source, self.config.node_features, FEATURE_EXTS)
        label_path = _sibling(source, self.config.node_labels, LABEL_EXTS)
        x = None
        if feat_path is not None:
            if feat_path.endswith(".npy"):
                try:
                    x = np.load(feat_path, allow_pickle=False)
                except Exception as e:
                    raise TokenizeError(
                        feat_path, "corrupt", f"not a readable .npy array: {type(e).__name__}: {e}"
                    ) from None
            else:
                x = _read_numeric_rows(feat_path)
            if x.ndim == 1:
                x = x[:, None]
            if x.ndim != 2 or x.dtype.kind not in "fiub":
                raise TokenizeError(
                    feat_path,
                    "invalid",
                    f"node features must be a numeric (N, F) array, got {x.dtype} {x.shape}",
                )
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 -> inf, refused below
                x = x.astype(np.float32)
            if not np.isfinite(x).all():
                raise TokenizeError(
                    feat_path, "invalid", "node features contain NaN or inf (or overflow float32)"
                )
        labels = None  # (N',) one label per node, or None
        pairs = None  # (P, 2) int64 (node, label) rows, or None
        if label_path is not None:
            if label_path.endswith(".npy"):
                try:
                    lab = np.asarray(np.load(label_path, allow_pickle=False))
                except Exception as e:
                    raise TokenizeError(
                        label_path, "corrupt", f"not a readable .npy array: {type(e).__name__}: {e}"
                    ) from None
            else:
                lab = _read_numeric_rows(label_path)
            if lab.dtype.kind not in "biuf":
                raise TokenizeError(label_path, "invalid", f"node labels must be integers, got {lab.dtype}")
            if lab.ndim == 2 and lab.shape[1] == 2:  # node, label rows
                nodes = lab[:, 0]
                if (
                    not np.isfinite(lab).all()
                    or (lab != np.round(lab)).any()
                    or (nodes < 0).any()
                    or (nodes >= 2**53).any()
                ):
                    raise TokenizeError(
                        label_path, "invalid", "node,label rows need a non-negative integer node id"
                    )
                pairs = lab.astype(np.int64)
            else:
                lab = lab.reshape(-1)
                if not np.isfinite(lab).all() or (lab != np.round(lab)).any() or (np.abs(lab) >= 2**53).any():
                    raise TokenizeError(
                        label_path,
                        "invalid",
                        "node labels must be integers (one per node; negative = unlabelled), "
                        f"got {_first_non_integer(lab)}",
                    )
                labels = lab.astype(np.int64)
        n = self._edge_list_size(source, ei, x, pairs, labels, label_path)
        if pairs is not None:
            labels = np.full(n, -1, np.int64)
            labels[pairs[:, 0]] = pairs[:, 1]
        if x is None:
            log.info(
                "%s: no node-features file (%s); using one constant feature per node",
                source,
                self.config.node_features,
            )
            x = np.ones((n, 1), np.float32)
        names = None
        node_labels = None
        if labels is not None:
            if labels.size > n:
                raise TokenizeError(label_path, "invalid", f"{labels.size} labels for {n} nodes")
            labels = np.concatenate([labels, np.full(n - labels.size, -1, np.int64)])
            classes = np.unique(labels[labels >= 0])
            node_labels = np.where(labels >= 0, np.searchsorted(classes, labels), -1).astype(np.int64)
            names = tuple(str(int(c)) for c in classes)
        g = Graph(x=x, edge_index=undirected(ei, n), node_labels=node_labels, meta={})
        return GraphDataset(name=os.path.basename(source), level="node", graphs=[g], label_names=names)

    def _edge_list_size(
        self,
        source: str,
        ei: np.ndarray,
        x: np.ndarray | None,
        pairs: np.ndarray | None,
        labels: np.ndarray | None,
        label_path: str | None,
    ) -> int:
        """The node count of an edge list: the features file's rows, else the largest node id + 1
        (and at least the length of a plain labels file). Node ids are array indices, so without
        a features file an id far beyond the number of distinct ids (more than 10x + 1000) is
        refused (TokenizeError invalid) instead of allocating features for the gap."""
        ids = ei.reshape(-1) if pairs is None else np.concatenate([ei.reshape(-1), pairs[:, 0]])
        top = int(ids.max(initial=-1))
        if x is not None:
            n = int(x.shape[0])
            if ei.size and ei.max() >= n:
                raise TokenizeError(
                    source, "invalid", f"node id {int(ei.max())} but the features file has {n} rows"
                )
            if pairs is not None and pairs.size and pairs[:, 0].max() >= n:
                raise TokenizeError(
                    label_path,
                    "invalid",
                    f"node id {int(pairs[:, 0].max())} but the features file has {n} rows",
                )
            return n
        distinct = _too_sparse(top, ids)
        if distinct:
            raise TokenizeError(
                source,
                "invalid",
                f"node id {top} but only {distinct} distinct node ids: ids are row indices 0..N-1, so "
                f"this would make {top + 1} nodes; relabel the nodes to consecutive ids (or add a "
                f"features file {self.config.node_features!r} with one row per node)",
            )
        return max(top + 1, 0 if labels is None else int(labels.size))

    # ---- tokenize -----------------------------------------------------------------------------
    def tokenize(self, raw: GraphDataset | Graph, *, source: str = "") -> list[Record]:
        """One record per graph of a graph-level dataset (``#k`` for ``meta["graph"] == k``, else
        for the k-th graph), one per centre node of a large graph, or one for a single Graph. A Graph without nodes raises TokenizeError(empty); inside a
        dataset, graphs without nodes are skipped (logged) and an all-empty dataset raises."""
        if isinstance(raw, Graph):
            if raw.num_nodes == 0:
                raise TokenizeError(source, "empty", "graph has no nodes")
            self._check_width(raw, source)
            return [self._record(raw, f"{source}#0", source, raw.label, dict(raw.meta))]
        if not isinstance(raw, GraphDataset):
            raise TokenizeError(
                source, "invalid", f"expected a GraphDataset or Graph, got {type(raw).__name__}"
            )
        if not any(g.num_nodes for g in raw.graphs):
            raise TokenizeError(source, "empty", "the dataset has no nodes")
        if raw.level == "node":
            return self._tokenize_large(raw.graphs[0], source)
        records = []
        skipped = 0
        for i, g in enumerate(raw.graphs):
            if g.num_nodes == 0:
                skipped += 1
                continue
            self._check_width(g, source)
            k = int(g.meta.get("graph", i))  # the graph's number in the dataset (ids may skip some)
            records.append(self._record(g, f"{source}#{k}", source, g.label, {"graph": k}))
        if skipped:
            log.warning("%s: skipped %d graph(s) without nodes", source, skipped)
            report_skipped(source, "graphs", skipped, len(raw.graphs), "a graph without nodes")
        return records

    def _check_width(self, g: Graph, source: str) -> None:
        if self._feature_dim is None:
            self._feature_dim = int(g.x.shape[1])
        elif g.x.shape[1] != self._feature_dim:
            raise TokenizeError(
                source,
                "config",
                f"node features are {g.x.shape[1]} wide but the tokenizer expects {self._feature_dim}",
            )

    def _record(self, g: Graph, rid: str, source: str, label: int | None, meta: dict[str, Any]) -> Record:
        n = g.num_nodes
        try:
            pe = laplacian_pe(g.edge_index, n, self.config.pe_dim, dense_max=self.config.pe_dense_max)
        except PEConvergenceError as e:
            raise TokenizeError(source, "invalid", f"{os.path.basename(rid)}: {e}") from None
        meta.update(num_nodes=n, num_edges=g.num_edges)
        return Record(
            id=rid,
            source=source,
            tokens=np.array(g.x, dtype=np.float32, copy=True),
            positions=pe,
            edges=np.ascontiguousarray(g.edge_index.T, dtype=np.int32),
            label=label,
            meta=meta,
        )

    def _tokenize_large(self, g: Graph, source: str) -> list[Record]:

        c = self.config
        self._check_width(g, source)
        n = g.num_nodes
        adj = sp.csr_matrix((np.ones(g.num_edges), (g.edge_index[0], g.edge_index[1])), shape=(n, n))
        if c.subgraph_centers:
            centers = np.unique(np.linspace(0, n - 1, min(c.subgraph_centers, n)).round().astype(np.int64))
        else:
            centers = np.arange(n)
        records = []
        for center in centers:  # one sample per centre (a loop over samples, not tokens)
            rng = np.random.default_rng([c.seed, int(center)])
            nodes = k_hop_nodes(adj, int(center), c.subgraph_hops, c.subgraph_max_nodes, rng)
            sub = Graph(x=g.x[nodes], edge_index=induced_subgraph(adj, nodes))
            label = None
            if g.node_labels is not None and g.node_labels[center] >= 0:
                label = int(g.node_labels[center])
            meta = {"center": 0, "center_node": int(center), "nodes": nodes.tolist(), "hops": c.subgraph_hops}
            records.append(self._record(sub, f"{source}#{int(center)}", source, label, meta))
        return records

    def detokenize(self, record: Record) -> Graph:
        """The record's graph back: node features (N, F) and edge_index (2, E), exactly."""
        edges = np.zeros((0, 2), np.int64) if record.edges is None else np.asarray(record.edges, np.int64)
        return Graph(
            x=np.array(record.tokens, dtype=np.float32, copy=True),
            edge_index=np.ascontiguousarray(edges.T),
            label=record.label,
            meta=dict(record.meta),
        )

    # ---- render -------------------------------------------------------------------------------
    def render(self, raw: GraphDataset | Graph, path: str) -> None:
        """Draw one graph (the first non-empty graph of a dataset; for a large graph, the k-hop
        sample around node 0) with a spring layout (networkx, when installed) or the first two
        Laplacian eigenvectors; nodes coloured by their feature class (argmax) or first feature."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure

        g = raw
        if isinstance(raw, GraphDataset):
            g = next((h for h in raw.graphs if h.num_nodes), raw.graphs[0])
            if raw.level == "node" and g.num_nodes > self.config.subgraph_max_nodes:
                adj = sp.csr_matrix((np.ones(g.num_edges), tuple(g.edge_index)), shape=(g.num_nodes,) * 2)
                rng = np.random.default_rng([self.config.seed, 0])
                nodes = k_hop_nodes(adj, 0, self.config.subgraph_hops, self.config.subgraph_max_nodes, rng)
                g = Graph(x=g.x[nodes], edge_index=induced_subgraph(adj, nodes))
        n = g.num_nodes
        pos = self._layout(g)
        fig = Figure(figsize=(5, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if g.num_edges:
            seg = np.stack([pos[g.edge_index[0]], pos[g.edge_index[1]]], axis=1)  # (E, 2, 2)
            ax.add_collection(LineCollection(seg, colors="0.6", linewidths=0.8, zorder=1))
        colour = g.x.argmax(axis=1) if g.x.shape[1] > 1 else g.x[:, 0]
        ax.scatter(
            pos[:, 0], pos[:, 1], c=colour, s=40, cmap="tab10", zorder=2, edgecolors="k", linewidths=0.5
        )
        ax.set_title(
            f"{n} nodes, {g.num_edges // 2} edges" + (f", label {g.label}" if g.label is not None else "")
        )
        ax.set_axis_off()
        ax.autoscale_view()
        fig.savefig(path)

    def _layout(self, g: Graph) -> np.ndarray:
        """(N, 2) node coordinates."""
        try:
            import networkx as nx
        except ImportError:
            nx = None
        if nx is not None:
            G = nx.Graph()
            G.add_nodes_from(range(g.num_nodes))
            G.add_edges_from(g.edge_index.T.tolist())
            lay = nx.spring_layout(G, seed=0)
            return np.array([lay[i] for i in range(g.num_nodes)], np.float64).reshape(-1, 2)
        pe = laplacian_pe(g.edge_index, g.num_nodes, 2)
        return pe.astype(np.float64)
