import os
import pickle
from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse as sp

from maskloom.testing import check_tokenizer
from maskloom.tokenizers import TokenizeError, get_tokenizer
from maskloom.tokenizers.graph import (
    Graph,
    GraphDataset,
    GraphTokenizer,
    laplacian_pe,
    normalized_laplacian,
    undirected,
)

# three graphs, TU numbering (1-based, global node ids):
#   graph 1: triangle 1-2-3            label  1
#   graph 2: path 4-5-6-7              label -1   (its edges listed in one direction only)
#   graph 3: star 8 -> 9, 10, 11       label  1
TRIANGLE = [(1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (3, 1)]
PATH = [(4, 5), (5, 6), (6, 7)]
STAR = [(8, 9), (9, 8), (8, 10), (10, 8), (8, 11), (11, 8)]
NODE_LABELS = [0, 0, 1, 2, 2, 2, 2, 1, 0, 0, 0]
NODE_ATTRS = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10.5]


def write_tu(folder, name="TOY", attrs=True, labels=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_A.txt").write_text("".join(f"{a}, {b}\n" for a, b in TRIANGLE + PATH + STAR))
    (folder / f"{name}_graph_indicator.txt").write_text("\n".join(["1"] * 3 + ["2"] * 4 + ["3"] * 4) + "\n")
    (folder / f"{name}_graph_labels.txt").write_text("1\n-1\n1\n")
    if labels:
        (folder / f"{name}_node_labels.txt").write_text("\n".join(map(str, NODE_LABELS)) + "\n")
    if attrs:
        (folder / f"{name}_node_attributes.txt").write_text("\n".join(map(str, NODE_ATTRS)) + "\n")
    return str(folder)


def write_edge_list(tmp_path, edges, *, features=None, labels=None, stem="g", header=True):
    p = tmp_path / f"{stem}.csv"
    p.write_text(("src,dst\n" if header else "") + "".join(f"{a},{b}\n" for a, b in edges))
    if features is not None:
        np.save(tmp_path / f"{stem}.features.npy", np.asarray(features, np.float32))
    if labels is not None:
        (tmp_path / f"{stem}.labels.txt").write_text("\n".join(map(str, labels)) + "\n")
    return str(p)


def onehot(i, n=3):
    v = [0.0] * n
    v[i] = 1.0
    return v


# ---- structure and PE ---------------------------------------------------------------------------
def test_undirected_symmetrises_dedups_and_drops_self_loops():
    ei = np.array([[0, 1, 1, 2, 2], [1, 0, 2, 2, 1]])
    assert undirected(ei, 3).tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]


def test_pe_of_a_4_cycle_has_eigenvalues_1_1_2_and_zero_padding():
    cycle = undirected(np.array([[0, 1, 2, 3], [1, 2, 3, 0]]), 4)
    pe, vals = laplacian_pe(cycle, 4, 8, return_eigenvalues=True)
    assert pe.shape == (4, 8) and pe.dtype == np.float32
    np.testing.assert_allclose(vals, [1, 1, 2, 0, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_array_equal(pe[:, 3:], 0)
    lap = normalized_laplacian(cycle, 4)
    np.testing.assert_allclose(lap @ pe[:, :3], pe[:, :3] * vals[:3], atol=1e-6)
    # the eigenvalue-2 eigenvector is the alternating one, sign-fixed: first largest entry positive
    np.testing.assert_allclose(pe[:, 2], [0.5, -0.5, 0.5, -0.5], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pe[:, :3], axis=0), 1, atol=1e-6)


def test_pe_sign_convention_and_tiny_graphs():
    pe = laplacian_pe(np.array([[0, 1], [1, 0]]), 2, 3)
    np.testing.assert_allclose(pe, [[2**-0.5, 0, 0], [-(2**-0.5), 0, 0]], atol=1e-6)
    np.testing.assert_array_equal(laplacian_pe(np.zeros((2, 0), np.int64), 1, 4), np.zeros((1, 4)))
    # path 0-1-2: L eigenvalues 0, 1, 2
    _, vals = laplacian_pe(undirected(np.array([[0, 1], [1, 2]]), 3), 3, 2, return_eigenvalues=True)
    np.testing.assert_allclose(vals, [1, 2], atol=1e-12)


def test_sparse_eigsh_agrees_with_dense(monkeypatch):
    import maskloom.tokenizers.graph as graph

    calls = []
    real = graph._component_eigenpairs
    monkeypatch.setattr(graph, "_component_eigenpairs", lambda *a: calls.append(a[0].shape) or real(*a))
    n = 300  # (a component below graph.SPARSE_MIN_NODES is solved dense whatever dense_max)
    path = undirected(np.stack([np.arange(n - 1), np.arange(1, n)]), n)
    dense, wd = laplacian_pe(path, n, 4, return_eigenvalues=True)
    sparse, ws = laplacian_pe(path, n, 4, dense_max=1, return_eigenvalues=True)
    assert calls == [(n, n)]
    np.testing.assert_allclose(ws, wd, atol=1e-8)
    np.testing.assert_allclose(sparse, dense, atol=1e-5)  # distinct eigenvalues: the same vectors


# ---- TU datasets ----------------------------------------------------------------------------------
def test_tu_folder_exact_nodes_edges_labels_features(tmp_path):
    src = write_tu(tmp_path / "TOY")
    tok = GraphTokenizer()
    ds = tok.read(src)
    assert isinstance(ds, GraphDataset) and ds.level == "graph" and ds.name == "TOY"
    assert [g.num_nodes for g in ds.graphs] == [3, 4, 4]
    assert tok.spec().token_dim == 4 and tok.label_names() == ("-1", "1")
    recs = tok.tokenize(ds, source=src)
    assert [r.id for r in recs] == [f"{src}#0", f"{src}#1", f"{src}#2"]
    assert [r.label for r in recs] == [1, 0, 1]
    assert recs[0].edges.tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1]]
    assert recs[1].edges.tolist() == [[0, 1], [1, 0], [1, 2], [2, 1], [2, 3], [3, 2]]  # symmetrised
    assert recs[2].edges.tolist() == [[0, 1], [0, 2], [0, 3], [1, 0], [2, 0], [3, 0]]
    assert recs[1].edges.dtype == np.int32
    expected = [[a, *onehot(lab)] for a, lab in zip(NODE_ATTRS, NODE_LABELS)]
    np.testing.assert_array_equal(np.concatenate([r.tokens for r in recs]), np.asarray(expected, np.float32))
    assert recs[0].positions.shape == (3, 8) and recs[0].positions.dtype == np.float32
    # triangle: normalised Laplacian eigenvalues 0, 1.5, 1.5 -> PE columns span the non-trivial space
    lap = normalized_laplacian(undirected(recs[0].edges.T, 3), 3)
    np.testing.assert_allclose(lap @ recs[0].positions[:, :2], 1.5 * recs[0].positions[:, :2], atol=1e-6)
    assert recs[2].meta == {"graph": 2, "num_nodes": 4, "num_edges": 6}


@pytest.mark.parametrize(("rule", "width", "first"), [("attributes", 1, [0.5]), ("labels", 3, [1, 0, 0])])
def test_tu_feature_rule(tmp_path, rule, width, first):
    src = write_tu(tmp_path / "raw")  # the raw/ layout of PyG downloads
    tok = GraphTokenizer({"tu_features": rule})
    recs = tok(str(tmp_path))
    assert tok.spec().token_dim == width
    assert recs[0].tokens[0].tolist() == first
    assert src.endswith("raw")


def test_tu_without_node_features_gets_a_constant(tmp_path):
    src = write_tu(tmp_path / "BARE", name="BARE", attrs=False, labels=False)
    tok = GraphTokenizer()
    recs = tok(src)
    assert tok.spec().token_dim == 1
    np.testing.assert_array_equal(recs[1].tokens, np.ones((4, 1), np.float32))
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer({"tu_features": "attributes"})(src)
    assert e.value.kind == "config"


def test_detokenize_round_trip_is_exact(tmp_path):
    src = write_tu(tmp_path / "TOY")
    tok = GraphTokenizer()
    ds = tok.read(src)
    for g, rec in zip(ds.graphs, tok.tokenize(ds, source=src)):
        out = tok.detokenize(rec)
        np.testing.assert_array_equal(out.x, g.x)
        np.testing.assert_array_equal(out.edge_index, g.edge_index)
        assert out.edge_index.shape[0] == 2 and out.label == g.label


# ---- large graphs ---------------------------------------------------------------------------------
def path_graph(tmp_path, n=6, **kw):
    feats = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return write_edge_list(tmp_path, [(i, i + 1) for i in range(n - 1)], features=feats, **kw), feats


def test_edge_list_subgraph_per_centre(tmp_path):
    src, feats = path_graph(tmp_path, labels=[5, 7, 5, -1, 7, 7])
    tok = GraphTokenizer({"subgraph_hops": 1})
    recs = tok(src)
    assert tok.label_names() == ("5", "7") and tok.spec().token_dim == 2
    assert [r.id for r in recs] == [f"{src}#{i}" for i in range(6)]
    assert [r.label for r in recs] == [0, 1, 0, None, 1, 1]  # node 3 is unlabelled
    r = recs[2]
    assert r.meta == {
        "center": 0,
        "center_node": 2,
        "nodes": [2, 1, 3],
        "hops": 1,
        "num_nodes": 3,
        "num_edges": 4,
    }
    np.testing.assert_array_equal(r.tokens, feats[[2, 1, 3]])
    assert r.edges.tolist() == [[0, 1], [0, 2], [1, 0], [2, 0]]
    assert recs[0].meta["nodes"] == [0, 1]
    # detokenize gives the induced subgraph exactly
    g = tok.detokenize(r)
    assert g.edge_index.tolist() == [[0, 0, 1, 2], [1, 2, 0, 0]]
    np.testing.assert_array_equal(g.x, feats[[2, 1, 3]])


def test_subgraph_budget_centres_and_hops(tmp_path):
    src, _ = path_graph(tmp_path)
    recs = GraphTokenizer({"subgraph_hops": 2, "subgraph_max_nodes": 4, "subgraph_centers": 3})(src)
    assert [r.meta["center_node"] for r in recs] == [0, 2, 5]  # linspace(0, 5, 3) rounded
    assert recs[0].meta["nodes"] == [0, 1, 2]
    assert recs[1].meta["nodes"][:3] == [2, 1, 3] and len(recs[1].meta["nodes"]) == 4  # one of 0, 4
    assert recs[1].meta["nodes"][3] in (0, 4)
    # a star centre with 10 leaves and a budget of 4: three leaves, seeded, sorted, deterministic
    star = write_edge_list(tmp_path, [(0, i) for i in range(1, 11)], stem="star")
    tok = GraphTokenizer({"subgraph_max_nodes": 4, "subgraph_centers": 1})
    a, b = tok(star)[0], tok(star)[0]
    nodes = a.meta["nodes"]
    assert nodes[0] == 0 and len(nodes) == 4 and nodes[1:] == sorted(nodes[1:]) and a.meta == b.meta
    np.testing.assert_array_equal(a.tokens, np.ones((4, 1), np.float32))  # no features file
    assert GraphTokenizer({"subgraph_hops": 0, "subgraph_centers": 1})(star)[0].meta["nodes"] == [0]


def test_edge_list_node_label_pairs_and_errors(tmp_path):
    src = write_edge_list(tmp_path, [(0, 1), (1, 2)], header=False)
    (tmp_path / "g.labels.csv").write_text("node,label\n2,1\n0,0\n")
    recs = GraphTokenizer()(src)
    assert [r.label for r in recs] == [0, None, 1]
    bad = write_edge_list(tmp_path, [(0, 9)], features=np.zeros((3, 2)), stem="bad")
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(bad)
    assert e.value.kind == "invalid" and "node id 9" in e.value.reason
    (tmp_path / "neg.csv").write_text("0,-1\n")
    (tmp_path / "one.csv").write_text("0\n1\n")
    (tmp_path / "x.gml").write_text("graph")
    for name, kind in (
        ("neg.csv", "invalid"),
        ("one.csv", "corrupt"),
        ("x.gml", "unsupported"),
        ("nothing.csv", "missing"),
    ):
        with pytest.raises(TokenizeError) as e:
            GraphTokenizer()(str(tmp_path / name))
        assert e.value.kind == kind, name
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(str(tmp_path / "emptydir"))
    assert e.value.kind == "unsupported"


def test_planetoid_folder(tmp_path):
    # read_planetoid_data assumes 500 validation nodes after the training ones, so the smallest
    # valid dataset has > 502 nodes: 510 on a ring; train x = nodes 0-1, allx = 0-504, test = 505-509
    n = 510
    feats = (np.arange(n * 3).reshape(n, 3) % 7).astype(np.float32)
    cls = np.arange(n) % 2
    y = np.eye(2)[cls]
    files = {
        "x": sp.csr_matrix(feats[:2]),
        "allx": sp.csr_matrix(feats[:505]),
        "tx": sp.csr_matrix(feats[505:]),
        "y": y[:2],
        "ally": y[:505],
        "ty": y[505:],
        "graph": defaultdict(list, {i: [(i + 1) % n, (i - 1) % n] for i in range(n)}),
    }
    for k, v in files.items():
        with open(tmp_path / f"ind.tiny.{k}", "wb") as f:
            pickle.dump(v, f)
    (tmp_path / "ind.tiny.test.index").write_text("".join(f"{i}\n" for i in range(505, n)))
    tok = GraphTokenizer({"subgraph_hops": 1, "subgraph_centers": 6})
    ds = tok.read(str(tmp_path))
    assert ds.level == "node" and ds.graphs[0].num_nodes == n and ds.graphs[0].num_edges == 2 * n
    assert tok.label_names() == ("0", "1") and tok.spec().token_dim == 3
    recs = tok.tokenize(ds, source=str(tmp_path))
    centres = [0, 102, 204, 305, 407, 509]
    assert [r.meta["center_node"] for r in recs] == centres
    assert [r.label for r in recs] == [c % 2 for c in centres]
    assert recs[0].meta["nodes"] == [0, 1, n - 1]
    np.testing.assert_array_equal(recs[-1].tokens, feats[[509, 0, 508]])


# ---- empties, fit and artifacts -------------------------------------------------------------------
def test_graph_without_nodes_is_empty():
    tok = GraphTokenizer({"feature_dim": 2})
    empty = Graph(x=np.zeros((0, 2), np.float32), edge_index=np.zeros((2, 0), np.int64))
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(empty, source="e")
    assert (e.value.kind, e.value.source) == ("empty", "e")
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(GraphDataset(name="d", level="graph", graphs=[empty]), source="d")
    assert e.value.kind == "empty"
    one = Graph(x=np.ones((1, 2), np.float32), edge_index=np.zeros((2, 0), np.int64), label=3)
    recs = tok.tokenize(GraphDataset(name="d", level="graph", graphs=[empty, one]), source="d")
    assert [r.id for r in recs] == ["d#1"] and recs[0].label == 3 and recs[0].edges.shape == (0, 2)


def test_fit_artifacts_and_width_mismatch(tmp_path):
    src = write_tu(tmp_path / "TOY")
    tok = GraphTokenizer()
    with pytest.raises(RuntimeError, match="fit"):
        tok.spec()
    tok.fit([src])
    assert tok.spec().token_dim == 4 and tok.spec().position_axes == tuple(f"lap{i}" for i in range(8))
    assert tok.spec().position_kind == "spectral"
    assert tok.save_artifacts(str(tmp_path / "art")) == ["graph_schema.json"]
    fresh = GraphTokenizer()
    fresh.load_artifacts(str(tmp_path / "art"))
    assert fresh.spec() == tok.spec() and fresh.label_names() == ("-1", "1")
    other = write_tu(tmp_path / "BARE", name="BARE", attrs=False, labels=False)
    with pytest.raises(TokenizeError) as e:
        fresh(other)
    assert e.value.kind == "config" and "4" in e.value.reason
    assert GraphTokenizer({"feature_dim": 4}).spec().token_dim == 4


def test_render_writes_png(tmp_path):
    tok = GraphTokenizer({"subgraph_max_nodes": 3})
    tok.render(tok.read(write_tu(tmp_path / "TOY")), str(tmp_path / "a.png"))
    src, _ = path_graph(tmp_path)
    tok = GraphTokenizer({"subgraph_max_nodes": 3})  # another feature width: another tokenizer
    tok.render(tok.read(src), str(tmp_path / "b.png"))
    for n in ("a.png", "b.png"):
        assert (tmp_path / n).read_bytes()[:4] == b"\x89PNG"


def test_registered_and_conformance(tmp_path):
    assert isinstance(get_tokenizer("graph"), GraphTokenizer)
    tu = write_tu(tmp_path / "TOY")

    def compare(raw, out, rec):
        g = raw.graphs[rec.meta["graph"]]
        np.testing.assert_array_equal(out.x, g.x)
        np.testing.assert_array_equal(out.edge_index, g.edge_index)

    assert check_tokenizer(GraphTokenizer(), [tu], compare=compare) == {
        "sources": 1,
        "records": 3,
        "tokens": 11,
    }
    a, _ = path_graph(tmp_path, labels=[0, 1, 0, 1, 0, 1], stem="a")
    b, _ = path_graph(tmp_path, n=4, labels=[1, 0, 1, 0], stem="b")
    report = check_tokenizer(GraphTokenizer({"subgraph_hops": 1}), [a, b])
    assert report["records"] == 10


def test_class_names_must_agree_across_sources(tmp_path):
    a, _ = path_graph(tmp_path, labels=[0, 1, 0, 1, 0, 1], stem="a")
    b, _ = path_graph(tmp_path, labels=[0, 1, 2, 1, 0, 1], stem="b")
    tok = GraphTokenizer()
    tok.fit([a])
    with pytest.raises(TokenizeError) as e:
        tok(b)
    assert e.value.kind == "config" and "class names" in e.value.reason


# ---- TU files that torch_geometric's reader squeezes, row-count checks --------------------------
def write_tu_files(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"R_{name}.txt").write_text(text)
    return str(folder)


def test_tu_single_graph_one_line_and_empty_edge_files(tmp_path):
    tok = GraphTokenizer({"pe_dim": 2})
    one = write_tu_files(
        tmp_path / "one",
        A="1, 2\n2, 1\n2, 3\n3, 2\n",
        graph_indicator="1\n1\n1\n",
        graph_labels="0\n",
        node_labels="4\n6\n4\n",
    )
    (rec,) = tok(one)
    assert rec.edges.tolist() == [[0, 1], [1, 0], [1, 2], [2, 1]] and rec.label == 0
    assert rec.tokens.tolist() == [[1, 0, 0], [0, 0, 1], [1, 0, 0]]  # one-hot over 4..6
    assert tok.label_names() == ("0",)
    edge = write_tu_files(tmp_path / "edge", A="2, 3", graph_indicator="1\n2\n2", graph_labels="5\n7")
    recs = GraphTokenizer({"pe_dim": 2})(edge)  # no trailing newline either
    assert [r.edges.tolist() for r in recs] == [[], [[0, 1], [1, 0]]] and [r.label for r in recs] == [0, 1]
    bare = write_tu_files(tmp_path / "bare", A="", graph_indicator="1\n2\n2\n", graph_labels="0\n1\n")
    recs = GraphTokenizer({"pe_dim": 2})(bare)
    assert [r.meta["num_nodes"] for r in recs] == [1, 2] and all(r.edges.shape == (0, 2) for r in recs)


@pytest.mark.parametrize(
    ("files", "kind", "words"),
    [
        ({"node_attributes": "1.0\n2.0\n"}, "corrupt", ["R_node_attributes.txt", "2 rows", "3 nodes"]),
        ({"node_labels": "0\n1\n0\n1\n"}, "corrupt", ["R_node_labels.txt", "4 rows", "3 nodes"]),
        ({"graph_labels": "0\n"}, "corrupt", ["R_graph_labels.txt", "1 rows", "2 graphs"]),
        ({"A": "1, 2\n2, 4\n"}, "corrupt", ["R_A.txt", "node 4", "1..3"]),
        ({"A": "2, 3\n"}, "corrupt", ["R_A.txt", "different graphs"]),
        ({"A": "1, 2, 3\n"}, "corrupt", ["R_A.txt", "3 value(s)"]),
        ({"A": "1, x\n"}, "corrupt", ["R_A.txt", "integers"]),
        ({"graph_indicator": "1\n2\n1\n"}, "corrupt", ["not sorted"]),
        ({"graph_indicator": "0\n1\n1\n"}, "corrupt", ["start at 1"]),
        ({"graph_indicator": "\n"}, "empty", ["no nodes"]),
        ({"node_attributes": "1.0\n1e300\n2.0\n"}, "invalid", ["NaN or inf"]),
    ],
)
def test_tu_inconsistent_files(tmp_path, files, kind, words):
    base = {"A": "1, 2\n2, 1\n", "graph_indicator": "1\n1\n2\n", "graph_labels": "0\n1\n"}
    src = write_tu_files(tmp_path / "R", **{**base, **files})
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(src)
    assert e.value.kind == kind and e.value.source == src
    assert all(w in e.value.reason for w in words), e.value.reason


def test_edge_list_huge_node_ids(tmp_path):
    (tmp_path / "huge.csv").write_text(f"0,{2**50}\n")
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(str(tmp_path / "huge.csv"))
    assert e.value.kind == "invalid" and f"node id {2**50}" in e.value.reason and "relabel" in e.value.reason
    # the limit: max id <= 10 * distinct ids + 1000 (here 2 distinct ids -> 1020 is fine, 1021 is not)
    (tmp_path / "edge.csv").write_text("0,1020\n")
    assert len(GraphTokenizer({"subgraph_centers": 1})(str(tmp_path / "edge.csv"))) == 1
    (tmp_path / "far.csv").write_text("0,1021\n")
    with pytest.raises(TokenizeError, match="node id 1021"):
        GraphTokenizer()(str(tmp_path / "far.csv"))
    (tmp_path / "float.csv").write_text("0,1e30\n")
    with pytest.raises(TokenizeError, match="too large"):
        GraphTokenizer()(str(tmp_path / "float.csv"))
    # node,label rows count as ids too; with a features file every id must be one of its rows
    src = write_edge_list(tmp_path, [(0, 1)], stem="lab", header=False)
    (tmp_path / "lab.labels.csv").write_text(f"0,1\n{2**40},0\n")
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(src)
    assert e.value.kind == "invalid" and e.value.source == src
    src = write_edge_list(tmp_path, [(0, 1)], features=np.zeros((2, 1)), stem="feat", header=False)
    (tmp_path / "feat.labels.csv").write_text("0,1\n5,0\n")
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(src)
    assert e.value.kind == "invalid" and "node id 5" in e.value.reason
    assert e.value.source == str(tmp_path / "feat.labels.csv")


# ---- fit over bad and disagreeing sources (QA B1) -----------------------------------------------
def test_fit_skips_bad_and_disagreeing_sources_which_read_rejects_later(tmp_path, caplog):
    bad = write_tu_files(tmp_path / "bad", A="1, 9\n", graph_indicator="1\n1\n", graph_labels="0\n")
    toy = write_tu(tmp_path / "TOY")  # 4 features, classes -1, 1
    bare = write_tu(tmp_path / "BARE", name="BARE", attrs=False, labels=False)  # 1 feature
    tok = GraphTokenizer()
    tok.fit([bad, toy, bare])  # the first readable source sets the schema; nothing raises
    assert tok.spec().token_dim == 4 and tok.label_names() == ("-1", "1")
    assert "graph fit skipped 2 source(s)" in caplog.text
    with pytest.raises(TokenizeError) as e:
        tok(bare)
    assert e.value.kind == "config" and e.value.reason == (
        "node features are 1 wide but this tokenizer was fitted for 4 "
        "(a table holds one width: tokenize such datasets into tables of their own)"
    )
    assert tok.spec().token_dim == 4  # a rejected source changes nothing
    with pytest.raises(TokenizeError) as e:
        tok(bad)
    assert e.value.kind == "corrupt"
    # a source with the fitted width but other class names: rejected, and nothing is recorded
    pinned = GraphTokenizer({"feature_dim": 4})
    other = write_tu_files(
        tmp_path / "other", A="", graph_indicator="1\n", graph_labels="3\n", node_attributes="1, 2, 3, 4\n"
    )
    pinned.fit([toy, other])
    assert pinned.label_names() == ("-1", "1")
    with pytest.raises(TokenizeError, match="class names") as e:
        pinned(other)
    assert e.value.kind == "config"


def test_fit_with_no_readable_source_records_width_1(tmp_path):
    bare = write_tu(tmp_path / "BARE", name="BARE", attrs=False, labels=False)
    tok = GraphTokenizer({"tu_features": "attributes"})  # BARE has no node attributes
    tok.fit([bare, str(tmp_path / "absent.csv")])
    assert tok.spec().token_dim == 1 and tok.label_names() is None
    tok.save_artifacts(str(tmp_path / "art"))
    worker = GraphTokenizer({"tu_features": "attributes"})
    worker.load_artifacts(str(tmp_path / "art"))
    with pytest.raises(TokenizeError) as e:
        worker(bare)
    assert (e.value.kind, e.value.reason) == (
        "config",
        "tu_features='attributes' but the dataset has no node attributes",
    )
    pinned = GraphTokenizer({"feature_dim": 3})
    pinned.fit([str(tmp_path / "absent.csv")])
    assert pinned.spec().token_dim == 3


def test_preprocess_job_with_bad_and_disagreeing_datasets_finishes_with_error_rows(tmp_path):
    from maskloom.pipelines.preprocess import preprocess
    from maskloom.tables import TokenTable

    bad = write_tu_files(tmp_path / "a_bad", A="1, 9\n", graph_indicator="1\n1\n", graph_labels="0\n")
    toy = write_tu(tmp_path / "b_toy", name="TOY")
    bare = write_tu(tmp_path / "c_bare", name="BARE", attrs=False, labels=False)
    out = str(tmp_path / "out")
    res = preprocess([bad, toy, bare], "graph", {"pe_dim": 2}, out, num_workers=0, progress=False)
    assert (res.inputs, res.rows, res.errors) == (3, 3, 2)
    table = TokenTable(out)
    assert {r.source for r in table.records()} == {toy}
    errors = {os.path.basename(e["source"]): e["kind"] for e in table.errors().to_pylist()}
    assert errors == {"a_bad": "corrupt", "c_bare": "config"}
    # every source unusable with the config: the job still ends, with one error row each
    out2 = str(tmp_path / "out2")
    res = preprocess([bare], "graph", {"tu_features": "labels"}, out2, num_workers=0, progress=False)
    assert (res.inputs, res.rows, res.errors) == (1, 0, 1)
    assert [e["kind"] for e in TokenTable(out2).errors().to_pylist()] == ["config"]


# ---- TU node labels, graph ids, graph labels (QA B2, B3) ----------------------------------------
def test_tu_node_label_one_hot_width_and_absurd_spans(tmp_path):
    base = {"A": "1, 2\n", "graph_indicator": "1\n1\n2\n", "graph_labels": "0\n1\n"}
    # a span of up to 10 x the distinct values + 1000 is one-hot encoded: here 2 values, 1020 wide
    ok = write_tu_files(tmp_path / "ok", **base, node_labels="5\n1024\n5\n")
    tok = GraphTokenizer({"pe_dim": 1})
    recs = tok(ok)
    assert tok.spec().token_dim == 1020
    tokens = np.concatenate([r.tokens for r in recs])
    assert tokens.shape == (3, 1020) and tokens.sum() == 3
    assert tokens[:, 0].tolist() == [1, 0, 1] and tokens[1, 1019] == 1
    for labels, span in (
        ("0\n1021\n0\n", "0 to 1021"),
        (f"{-(2**62)}\n{2**62}\n0\n", f"{-(2**62)} to {2**62}"),
    ):
        far = write_tu_files(tmp_path / "far", **base, node_labels=labels)
        with pytest.raises(TokenizeError) as e:
            GraphTokenizer()(far)
        assert e.value.kind == "invalid" and e.value.source == far
        assert span in e.value.reason and "R_node_labels.txt" in e.value.reason
        assert "relabel" in e.value.reason


def test_tu_graph_ids_with_gaps_give_records_of_the_graphs_that_have_nodes(tmp_path, caplog):
    # graph 2 has no nodes: records #0 and #2, labelled from rows 1 and 3 of the labels file; the
    # classes are the distinct values of the whole file
    src = write_tu_files(
        tmp_path / "gap", A="1, 2\n3, 4\n", graph_indicator="1\n1\n3\n3\n", graph_labels="5\n6\n7\n"
    )
    tok = GraphTokenizer({"pe_dim": 1})
    ds = tok.read(src)
    assert [g.meta["graph"] for g in ds.graphs] == [0, 2]
    recs = tok.tokenize(ds, source=src)
    assert [r.id for r in recs] == [f"{src}#0", f"{src}#2"]
    assert [r.meta["graph"] for r in recs] == [0, 2] and [r.label for r in recs] == [0, 2]
    assert tok.label_names() == ("5", "6", "7")
    assert all(r.edges.tolist() == [[0, 1], [1, 0]] for r in recs)
    assert "1 of the graph ids 1..3 have no nodes" in caplog.text
    # a gap of two million ids costs nothing
    huge = write_tu_files(tmp_path / "huge", A="1, 2\n", graph_indicator="1\n1\n2000000\n")
    recs = GraphTokenizer({"pe_dim": 1})(huge)
    assert [r.id for r in recs] == [f"{huge}#0", f"{huge}#1999999"]
    assert [r.meta["num_nodes"] for r in recs] == [2, 1]


def test_tu_graph_labels_with_rows_beyond_the_last_graph_are_corrupt(tmp_path):
    src = write_tu_files(tmp_path / "R", A="1, 2\n", graph_indicator="1\n1\n2\n", graph_labels="0\n1\n7\n7\n")
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(src)
    assert (e.value.kind, e.value.reason) == (
        "corrupt",
        "TU dataset R: R_graph_labels.txt has 4 rows but R_graph_indicator.txt names 2 graphs",
    )


# ---- edge-list side files (QA B4, B5) -----------------------------------------------------------
def write_side_files(folder):
    """g.csv with its features and labels files (as CSV), and a second edge list h.edges."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "g.csv").write_text("src,dst\n0,1\n1,2\n")
    (folder / "g.features.csv").write_text("3,1\n0,2\n1,1\n")
    (folder / "g.labels.csv").write_text("0\n1\n1\n")
    (folder / "h.edges").write_text("0 1\n")
    return folder


def test_companion_files_are_the_side_file_names_of_an_edge_list(tmp_path):
    tok = GraphTokenizer()
    d = str(tmp_path)
    assert tok.companion_files(os.path.join(d, "g.csv")) == tuple(
        os.path.join(d, n)
        for n in ("g.features.npy", "g.features.csv", "g.labels.npy", "g.labels.csv", "g.labels.txt")
    )
    assert tok.companion_files(d) == () and tok.companion_files(os.path.join(d, "x.txt")) == ()
    other = GraphTokenizer({"node_features": "feats/{stem}_x", "node_labels": "{stem}-y-{stem}"})
    assert other.companion_files(os.path.join(d, "g.edges"))[:2] == (
        os.path.join(d, "feats", "g_x.npy"),
        os.path.join(d, "feats", "g_x.csv"),
    )
    assert os.path.join(d, "g-y-g.txt") in other.companion_files(os.path.join(d, "g.edges"))
    with pytest.raises(ValueError, match="node_labels may hold no other"):
        GraphTokenizer({"node_labels": "{stem}.{kind}"})


def test_an_edge_lists_side_file_is_not_read_as_an_edge_list(tmp_path):
    folder = write_side_files(tmp_path / "d")
    tok = GraphTokenizer({"subgraph_centers": 1})
    assert len(tok(str(folder / "g.csv"))) == 1
    assert tok.spec().token_dim == 2 and tok.label_names() == ("0", "1")
    for name, what in (("g.features.csv", "features"), ("g.labels.csv", "labels")):
        with pytest.raises(TokenizeError) as e:
            GraphTokenizer()(str(folder / name))
        assert (e.value.kind, e.value.reason) == (
            "unsupported",
            f"is the node-{what} file of the edge list {folder / 'g.csv'} (Config.node_{what}), "
            "read with it; it is not an edge list",
        )
    # without the edge list it belongs to, such a name is an edge list like any other
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "k.features.csv").write_text("0,1\n")
    assert len(GraphTokenizer()(str(tmp_path / "lone" / "k.features.csv"))) == 2
    # patterns with folders and repeated stems are inverted too
    (folder / "feats").mkdir()
    (folder / "feats" / "g_x.csv").write_text("1\n2\n3\n")
    (folder / "g-y-g.csv").write_text("0\n0\n1\n")
    other = GraphTokenizer(
        {"node_features": "feats/{stem}_x", "node_labels": "{stem}-y-{stem}", "subgraph_hops": 1}
    )
    for name in ("feats/g_x.csv", "g-y-g.csv"):
        with pytest.raises(TokenizeError, match="is the node-.* file of the edge list") as e:
            other(str(folder / name))
        assert e.value.kind == "unsupported"
    assert [r.tokens.tolist() for r in other(str(folder / "g.csv"))][0] == [[1.0], [2.0]]


def test_find_inputs_leaves_out_side_files_found_by_a_walk_or_a_glob(tmp_path):
    from maskloom.pipelines.sources import find_inputs

    folder = write_side_files(tmp_path / "d")
    (folder / "sub").mkdir()
    (folder / "sub" / "k.features.csv").write_text("0,1\n")  # no k.csv beside it: an edge list
    tok = GraphTokenizer()

    def names(found):
        return [os.path.relpath(i.source, folder) for i in found.inputs]

    found = find_inputs(str(folder), extensions=tok.extensions, companions=tok.companion_files)
    assert names(found) == ["g.csv", "h.edges", os.path.join("sub", "k.features.csv")]
    found = find_inputs(str(folder / "*.csv"), extensions=tok.extensions, companions=tok.companion_files)
    assert names(found) == ["g.csv"]
    # named explicitly, a side file is an input (whose read says what it is)
    found = find_inputs(
        [str(folder), str(folder / "g.labels.csv")], extensions=tok.extensions, companions=tok.companion_files
    )
    assert names(found) == ["g.csv", "g.labels.csv", "h.edges", os.path.join("sub", "k.features.csv")]
    # without companions (other tokenizers) the walk is as before
    assert len(find_inputs(str(folder), extensions=tok.extensions)) == 5
    # the tokenizer's config decides what a side file is
    custom = GraphTokenizer({"node_features": "{stem}.attrs"})
    (folder / "h.attrs.csv").write_text("1\n2\n")
    found = find_inputs(str(folder), extensions=tok.extensions, companions=custom.companion_files)
    assert names(found) == ["g.csv", "g.features.csv", "h.edges", os.path.join("sub", "k.features.csv")]


@pytest.mark.parametrize(
    ("labels", "bad"), [("0\n0.5\n1\n", "0.5"), ("0\nnan\n1\n", "nan"), ("1e300\n0\n1\n", "1e+300")]
)
def test_edge_list_labels_must_be_integers(tmp_path, labels, bad, recwarn):
    src = write_edge_list(tmp_path, [(0, 1), (1, 2)], header=False)
    (tmp_path / "g.labels.csv").write_text(labels)
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(src)
    assert (e.value.kind, e.value.source) == ("invalid", str(tmp_path / "g.labels.csv"))
    assert e.value.reason == f"node labels must be integers (one per node; negative = unlabelled), got {bad}"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_edge_list_labels_npy_of_strings_is_invalid(tmp_path):
    src = write_edge_list(tmp_path, [(0, 1)], header=False)
    np.save(tmp_path / "g.labels.npy", np.array(["a", "b"]))
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(src)
    assert e.value.kind == "invalid" and "must be integers" in e.value.reason


# ---- the sparse PE's time bound --------------------------------------------------------------------
def ring(n):
    return undirected(np.stack([np.arange(n), (np.arange(n) + 1) % n]), n)


def test_sparse_pe_falls_back_to_shift_invert_when_lanczos_runs_out(monkeypatch):
    import maskloom.tokenizers.graph as graph

    n = 400
    path = undirected(np.stack([np.arange(n - 1), np.arange(1, n)]), n)
    dense, wd = laplacian_pe(path, n, 4, return_eigenvalues=True)
    monkeypatch.setattr(graph, "LANCZOS_WORK", 1)
    monkeypatch.setattr(graph, "LANCZOS_MIN_RESTARTS", 1)
    calls = []
    real = graph._shift_invert_solver
    monkeypatch.setattr(graph, "_shift_invert_solver", lambda *a: calls.append(1) or real(*a))
    sparse, ws = laplacian_pe(path, n, 4, dense_max=1, return_eigenvalues=True)
    assert calls == [1]  # Lanczos gave up after one restart; one LU serves every later run
    np.testing.assert_allclose(ws, wd, atol=1e-12)
    np.testing.assert_allclose(sparse, dense, atol=1e-5)  # distinct eigenvalues: the same vectors
    # a ring's eigenvalues come in pairs, and the sparse path finds both of each pair, as eigh does
    pe, w = laplacian_pe(ring(n), n, 4, dense_max=1, return_eigenvalues=True)
    _, wd = laplacian_pe(ring(n), n, 4, return_eigenvalues=True)
    np.testing.assert_allclose(w, wd, atol=1e-12)
    assert w[0] == pytest.approx(w[1]) and w[2] == pytest.approx(w[3])
    lap = normalized_laplacian(ring(n), n)
    np.testing.assert_allclose(lap @ pe, pe * w, atol=1e-6)


def test_pe_of_a_20000_node_ring_takes_seconds():
    import time

    t = time.perf_counter()
    _, w = laplacian_pe(ring(20_000), 20_000, 4, return_eigenvalues=True)
    assert time.perf_counter() - t < 30  # was 160-270 s: Lanczos on eigenvalues 5e-8 apart
    np.testing.assert_allclose(w, 1 - np.cos(2 * np.pi * np.array([1, 1, 2, 2]) / 20_000), rtol=1e-6)


def test_pe_that_does_not_converge_is_an_invalid_input(monkeypatch, tmp_path):
    import maskloom.tokenizers.graph as graph

    def fail(*a, **kw):
        raise graph.PEConvergenceError("the sparse eigensolver found no Laplacian positional encoding")

    monkeypatch.setattr(graph, "laplacian_pe", fail)
    src = write_tu(tmp_path / "TOY")
    with pytest.raises(TokenizeError) as e:
        GraphTokenizer()(src)
    assert (e.value.kind, e.value.source) == ("invalid", src)
    assert e.value.reason == "TOY#0: the sparse eigensolver found no Laplacian positional encoding"


def test_tiny_graphs_use_eigh_whatever_pe_dense_max():
    pe, w = laplacian_pe(
        undirected(np.array([[0, 1], [1, 2]]), 3), 3, 4, dense_max=0, return_eigenvalues=True
    )
    np.testing.assert_allclose(w, [1, 2, 0, 0], atol=1e-12)


def test_version_3_since_the_sparse_pe_changed():
    # 2: graphs above pe_dense_max nodes whose Lanczos solve needs more than the restart budget (long
    # rings, paths, chains) get their PE by shift-invert; it also finds both eigenvectors of each
    # repeated eigenvalue, which Lanczos missed (a 10,000-node ring's positions changed)
    # 3: graphs above pe_dense_max nodes: per connected component, with every copy of a repeated
    # eigenvalue (a grid's doubled ones, the 0 of each component), which Lanczos missed (positions of
    # such graphs changed; graphs up to pe_dense_max nodes keep theirs bit for bit)
    assert GraphTokenizer.version == "3"


# ---- the sparse PE: repeated eigenvalues and components --------------------------------------------
def grid(a, b):
    idx = np.arange(a * b).reshape(a, b)
    right = np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()])
    down = np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()])
    return undirected(np.concatenate([right, down], axis=1), a * b)


def rings(count, size):
    return undirected(np.concatenate([ring(size) + j * size for j in range(count)], axis=1), count * size)


def assert_same_eigenspaces(edge_index, n, pe, w, k):
    """``w`` are dense eigh's eigenvalues 1..k and the columns of ``pe`` are orthonormal eigenvectors
    of them, inside the span of eigh's eigenvectors up to w[-1] (with equal eigenvalues, also the
    same eigenspaces: for an eigenvalue of multiplicity c among 1..k, c orthonormal eigenvectors)."""
    import scipy.linalg

    lap = normalized_laplacian(edge_index, n)
    wd, ud = scipy.linalg.eigh(lap, subset_by_index=[0, k + 8])
    np.testing.assert_allclose(w, wd[1 : k + 1], atol=1e-8)
    v = pe.astype(np.float64)
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-6)
    np.testing.assert_allclose(lap @ v, v * w, atol=1e-6)
    assert scipy.linalg.subspace_angles(v, ud[:, wd <= w[-1] + 1e-8]).max() < 1e-5


def spy(monkeypatch, name):
    import maskloom.tokenizers.graph as graph

    calls = []
    real = getattr(graph, name)
    monkeypatch.setattr(graph, name, lambda *a: calls.append(a[0].shape[0]) or real(*a))
    return calls


def test_sparse_pe_of_a_grid_has_every_copy_of_its_doubled_eigenvalues(monkeypatch):
    # a square grid's symmetry doubles eigenvalues; Lanczos from one start vector found each once
    solves = spy(monkeypatch, "_component_eigenpairs")
    n, k = 900, 8
    pe, w = laplacian_pe(grid(30, 30), n, k, dense_max=100, return_eigenvalues=True)
    assert solves == [n]  # the sparse solver, not eigh
    assert w[0] == pytest.approx(w[1], abs=1e-10) and w[3] == pytest.approx(w[4], abs=1e-10)
    assert_same_eigenspaces(grid(30, 30), n, pe, w, k)
    pe2, w2 = laplacian_pe(grid(30, 30), n, k, dense_max=100, return_eigenvalues=True)
    np.testing.assert_array_equal(pe2, pe)  # deterministic
    np.testing.assert_array_equal(w2, w)


@pytest.mark.parametrize("dense_max", [100, 250])  # components solved sparse, or dense (200 nodes)
def test_sparse_pe_of_disconnected_rings_merges_the_components(monkeypatch, dense_max):
    solves = spy(monkeypatch, "_component_eigenpairs")
    n, k = 600, 8
    ei = rings(3, 200)
    pe, w = laplacian_pe(ei, n, k, dense_max=dense_max, return_eigenvalues=True)
    assert solves == ([200] * 3 if dense_max < 200 else [])
    # 0 three times (one per ring; the first skipped), then a ring's lowest pair, three times over
    np.testing.assert_allclose(w, [0, 0] + [1 - np.cos(2 * np.pi / 200)] * 6, atol=1e-10)
    assert_same_eigenspaces(ei, n, pe, w, k)
    # each vector lies in one ring; ties ordered by ring (smallest node id first)
    comp = [np.unique(np.flatnonzero(np.abs(pe[:, j]) > 1e-6) // 200) for j in range(k)]
    assert [c.tolist() for c in comp] == [[1], [2], [0], [0], [1], [1], [2], [2]]
    # a ring's null vector is constant on it (D^1/2 1 normalised), zero elsewhere
    np.testing.assert_allclose(pe[200:400, 0], 200**-0.5, atol=1e-7)
    np.testing.assert_array_equal(pe[:200, 0], 0)
    pe2 = laplacian_pe(ei, n, k, dense_max=dense_max)
    np.testing.assert_array_equal(pe2, pe)


def test_sparse_pe_with_isolated_nodes_and_components_smaller_than_k(monkeypatch):
    # a 150-node path (solved sparse), then a triangle, an edge and 3 isolated nodes
    tail = np.array([[150, 151, 152, 153], [151, 152, 150, 154]])
    ei = undirected(np.concatenate([np.stack([np.arange(149), np.arange(1, 150)]), tail], axis=1), 158)
    solves = spy(monkeypatch, "_component_eigenpairs")
    pe, w = laplacian_pe(ei, 158, 8, dense_max=10, return_eigenvalues=True)
    assert solves == [150]
    assert w[:2].tolist() == [0.0, 0.0]  # the triangle's and the edge's null; the path's is skipped
    assert_same_eigenspaces(ei, 158, pe, w, 8)
    # k larger than the small components: a triangle (0, 1.5, 1.5), an edge (0, 2), isolated nodes (1)
    small = undirected(np.array([[0, 1, 2, 3], [1, 2, 0, 4]]), 8)
    pe, w = laplacian_pe(small, 8, 4, dense_max=5, return_eigenvalues=True)
    np.testing.assert_allclose(w, [0, 1, 1, 1], atol=1e-12)
    np.testing.assert_allclose(pe[:, 0], [0, 0, 0, 2**-0.5, 2**-0.5, 0, 0, 0], atol=1e-7)  # the edge's null
    np.testing.assert_array_equal(pe[5:, 1:], np.eye(3))  # e_5, e_6, e_7: ties by node id
    np.testing.assert_array_equal(pe[:5, 1:], 0)
    # no edge at all: every eigenvalue is 1; the first isolated node's is the one skipped
    pe, w = laplacian_pe(np.zeros((2, 0), np.int64), 10, 3, dense_max=5, return_eigenvalues=True)
    np.testing.assert_array_equal(w, [1, 1, 1])
    np.testing.assert_array_equal(pe, np.eye(10, 3, k=-1))
    # more components with edges than k: only null vectors, one per component after the first
    many = rings(12, 5)
    pe, w = laplacian_pe(many, 60, 8, dense_max=10, return_eigenvalues=True)
    np.testing.assert_array_equal(w, np.zeros(8))
    np.testing.assert_allclose(pe[5:45], np.kron(np.eye(8), np.full((5, 1), 5**-0.5)), atol=1e-7)


def test_sparse_pe_that_does_not_converge_raises(monkeypatch):
    import maskloom.tokenizers.graph as graph

    monkeypatch.setattr(graph, "RESIDUAL_TOL", -1.0)  # no residual passes
    with pytest.raises(graph.PEConvergenceError, match="residual"):
        laplacian_pe(grid(30, 30), 900, 8, dense_max=100)


def test_pe_of_graphs_up_to_pe_dense_max_is_eigh_bit_for_bit():
    import scipy.linalg

    import maskloom.tokenizers.graph as graph

    for ei, n in ((grid(12, 12), 144), (rings(3, 40), 120)):
        w, v = scipy.linalg.eigh(normalized_laplacian(ei, n), subset_by_index=[0, 8])
        pe, vals = laplacian_pe(ei, n, 8, dense_max=n, return_eigenvalues=True)
        np.testing.assert_array_equal(pe, graph._fix_signs(v[:, 1:]).astype(np.float32))
        np.testing.assert_array_equal(vals, w[1:])
