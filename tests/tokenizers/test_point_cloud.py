import io
import struct
import warnings

import numpy as np
import pytest
import torch
import trimesh

from maskloom.geometry import chamfer_distance
from maskloom.testing import check_tokenizer
from maskloom.tokenizers import TokenizeError, get_tokenizer
from maskloom.tokenizers.point_cloud import PointCloudTokenizer

CORNERS = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], np.float64)
OFFSETS = np.array([[0.01, 0, 0], [-0.01, 0, 0], [0, 0.01, 0], [0, -0.01, 0]], np.float64)


def clusters() -> np.ndarray:
    """(16, 3): four tight clusters of four points at the corners of a tetrahedron; centroid 0."""
    return (CORNERS[:, None, :] + OFFSETS[None, :, :]).reshape(16, 3).astype(np.float32)


def small(**kw) -> PointCloudTokenizer:
    return PointCloudTokenizer({"num_points": 16, "num_groups": 4, "group_size": 4, **kw})


def nearest_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of a (N, 3), the distance to the nearest row of b (M, 3)."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def cloud(n: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, channels)).astype(np.float32) * 3 + 5


def test_registered_and_spec():
    tok = get_tokenizer("point_cloud")
    s = tok.spec()
    assert (s.token_dim, s.token_shape, s.position_axes, s.position_kind) == (
        96,
        (32, 3),
        ("x", "y", "z"),
        "continuous",
    )
    assert PointCloudTokenizer({"extra_channels": 1}).spec().token_dim == 128


def test_clusters_exact_tokens_positions_and_lossless_round_trip():
    tok = small()
    pts = clusters()
    before = pts.copy()
    [rec] = tok.tokenize(pts, source="c")
    np.testing.assert_array_equal(pts, before)  # caller's data untouched
    assert rec.id == "c#0" and rec.tokens.shape == (4, 12) and rec.positions.shape == (4, 3)
    assert rec.tokens.dtype == np.float32 and rec.positions.dtype == np.float32
    scale = np.sqrt(((CORNERS[0] + OFFSETS[0]) ** 2).sum())  # farthest point from the centroid 0
    assert rec.meta["scale"] == pytest.approx(scale)
    np.testing.assert_allclose(rec.meta["centroid"], 0, atol=1e-7)
    norm = pts / scale
    # FPS starts at point 0, then one centre per cluster; each centre is a point of the cloud
    assert np.allclose(rec.positions[0], norm[0], atol=1e-6)
    cluster_of = [int(np.argmin(((CORNERS / scale - p) ** 2).sum(1))) for p in rec.positions]
    assert sorted(cluster_of) == [0, 1, 2, 3]
    groups = rec.tokens.reshape(4, 4, 3)
    np.testing.assert_array_equal(groups[:, 0], 0)  # the centre itself, first, at offset 0
    # each group is its whole cluster: offsets within the cluster
    assert np.abs(groups).max() <= 0.02 / scale + 1e-6
    out = tok.detokenize(rec)
    assert out.shape == (16, 3)
    cd = chamfer_distance(torch.from_numpy(out)[None], torch.from_numpy(pts)[None], use_pytorch3d=False)
    assert cd.item() < 1e-10


def test_round_trip_points_come_from_the_input_default_config():
    pts = cloud(3000)
    tok = PointCloudTokenizer()
    [rec] = tok.tokenize(pts, source="x")
    assert rec.tokens.shape == (64, 96)
    out = tok.detokenize(rec)
    assert out.shape == (64 * 32, 3)
    assert nearest_dist(out, pts).max() < 1e-5 * 3
    # positions are in the unit sphere
    assert np.linalg.norm(rec.positions, axis=1).max() <= 1 + 1e-6


def test_version_is_2_since_small_clouds_are_no_longer_padded():
    assert PointCloudTokenizer.version == "2"


@pytest.mark.parametrize("n", [32, 40, 63])
def test_small_clouds_are_not_padded_each_group_is_its_nearest_distinct_points(n):
    """Fewer than num_points points: FPS + kNN on the cloud itself (version 1 padded it by
    repetition, so a 32-point cloud gave 32 copies of the centre in every group: all-zero tokens)."""
    tok = PointCloudTokenizer({"num_points": 64, "num_groups": 4, "group_size": 32})
    pts = cloud(n)
    [rec] = tok.tokenize(pts, source="p")
    assert rec.meta["num_valid_points"] == n and rec.tokens.shape == (4, 96)
    groups = tok.detokenize(rec).reshape(4, 32, 3)
    for centre, group in zip(rec.positions, groups, strict=True):
        centre = centre * rec.meta["scale"] + np.asarray(rec.meta["centroid"])
        nearest = pts[np.argsort(((pts - centre) ** 2).sum(1))[:32]]
        # the group is exactly the centre's 32 nearest input points, each once
        assert len(np.unique(np.round(group, 4), axis=0)) == 32
        np.testing.assert_allclose(group, nearest, atol=1e-5)
    assert len(np.unique(rec.positions, axis=0)) == 4


def test_too_small_and_transposed_hint():
    tok = PointCloudTokenizer({"num_points": 64, "num_groups": 4, "group_size": 32})
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(cloud(31), source="s")
    assert (e.value.kind, e.value.source, e.value.reason) == (
        "too_small",
        "s",
        "31 valid points, fewer than group_size=32",
    )
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(cloud(1), source="one")
    assert (e.value.kind, e.value.reason) == ("too_small", "1 valid points, fewer than group_size=32")
    with pytest.raises(TokenizeError) as e:
        PointCloudTokenizer().tokenize(cloud(500).T.copy(), source="t")
    assert (e.value.kind, e.value.reason) == (
        "too_small",
        "3 valid points, fewer than group_size=32; shape (3, 500) looks transposed (points must be rows: (N, 3+))",
    )


def test_fewer_points_than_groups_repeat_the_centres_in_fps_order():
    # an octahedron: centroid 0, scale 1; FPS from point 0 picks 0, 1 (opposite), then 2, 3, 4, 5
    # (all tied, lowest index first), so centres 6 and 7 repeat picks 0 and 1
    pts = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float32)
    tok = PointCloudTokenizer({"num_points": 16, "num_groups": 8, "group_size": 4})
    [rec] = tok.tokenize(pts, source="o")
    assert rec.tokens.shape == (8, 12) and rec.meta["scale"] == 1.0
    np.testing.assert_array_equal(rec.positions, pts[[0, 1, 2, 3, 4, 5, 0, 1]])
    np.testing.assert_array_equal(rec.tokens[6:], rec.tokens[:2])
    groups = rec.tokens.reshape(8, 4, 3)
    np.testing.assert_array_equal(groups[:, 0], 0)  # each centre first, at offset 0
    assert (np.linalg.norm(groups[:, 1:], axis=-1) == np.float32(np.sqrt(2))).all()  # 3 nearest at sqrt 2


def test_nan_points_are_dropped_all_nan_is_invalid():
    tok = small()
    pts = np.concatenate([clusters(), np.full((3, 3), np.nan, np.float32)])
    pts[16:, 0] = 1.0  # partly finite rows are dropped too
    [rec] = tok.tokenize(pts, source="n")
    assert rec.meta["dropped_nonfinite"] == 3 and rec.meta["num_valid_points"] == 16
    assert np.isfinite(rec.tokens).all()
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(np.full((20, 3), np.nan, np.float32), source="nan")
    assert e.value.kind == "invalid"
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(np.zeros((0, 3), np.float32), source="e")
    assert e.value.kind == "empty"


@pytest.mark.parametrize("n", [16, 2000])
def test_identical_points_are_invalid(n):
    pts = np.tile(np.array([[5.0, -3.0, 0.1]], np.float32), (n, 1))
    with pytest.raises(TokenizeError) as e:
        small().tokenize(pts, source="same")
    assert (e.value.kind, e.value.reason) == ("invalid", "all points are the same (zero extent)")
    # differing extra channels do not give the cloud a shape
    with_intensity = np.concatenate([pts, np.arange(n, dtype=np.float32)[:, None]], axis=1)
    with pytest.raises(TokenizeError) as e:
        small(extra_channels=1).tokenize(with_intensity, source="same")
    assert e.value.kind == "invalid"


def test_points_on_a_line_are_valid():
    pts = np.zeros((16, 3), np.float32)
    pts[:, 2] = np.arange(16)
    [rec] = small().tokenize(pts, source="line")
    assert rec.meta["scale"] == pytest.approx(7.5) and np.isfinite(rec.tokens).all()
    np.testing.assert_array_equal(rec.tokens.reshape(4, 4, 3)[..., :2], 0)


def test_extra_channels_carried_and_checked():
    pts = np.concatenate([clusters(), np.arange(16, dtype=np.float32)[:, None] * 10], axis=1)  # intensity
    tok = small(extra_channels=1)
    [rec] = tok.tokenize(pts, source="i")
    assert rec.tokens.shape == (4, 16)
    out = tok.detokenize(rec)
    assert out.shape == (16, 4)
    # every point keeps its own intensity
    order = np.argsort(out[:, 3])
    np.testing.assert_allclose(out[order], pts, atol=1e-5)
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(clusters(), source="xyz-only")
    assert e.value.kind == "config"
    # extra file channels are dropped with extra_channels=0
    assert small().tokenize(pts, source="i")[0].tokens.shape == (4, 12)


def test_subsampling_fps_and_random_are_deterministic():
    pts = cloud(500)
    for mode in ("fps", "random"):
        tok = PointCloudTokenizer({"num_points": 128, "num_groups": 8, "group_size": 16, "subsample": mode})
        a, b = tok.tokenize(pts, source="d")[0], tok.tokenize(pts.copy(), source="d")[0]
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.positions, b.positions)
        assert nearest_dist(tok.detokenize(a), pts).max() < 1e-4
    a = PointCloudTokenizer({"subsample": "random", "seed": 1, "num_points": 128}).tokenize(pts)[0]
    b = PointCloudTokenizer({"subsample": "random", "seed": 2, "num_points": 128}).tokenize(pts)[0]
    assert not np.array_equal(a.positions, b.positions)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_groups", 64.0),
        ("group_size", 16.5),
        ("num_points", 2000.5),
        ("num_points", "abc"),
        ("bin_columns", 4.0),
        ("seed", "abc"),
        ("seed", 1.0),
        ("extra_channels", True),
        ("sample_points", None),
    ],
)
def test_config_fields_must_be_integers(field, value):
    with pytest.raises(ValueError) as e:
        PointCloudTokenizer.Config(**{field: value})
    assert str(e.value) == f"{field} must be an integer, got {value!r}"
    with pytest.raises(ValueError, match=f"^point_cloud tokenizer config: {field} must be an integer"):
        PointCloudTokenizer({field: value})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_points", 0, "num_points must be >= 1, got 0"),
        ("extra_channels", -1, "extra_channels must be >= 0, got -1"),
        ("bin_columns", 2, "bin_columns must be >= 3 (x, y, z), got 2"),
        ("seed", -1, "seed must be >= 0, got -1"),
    ],
)
def test_config_ranges(field, value, message):
    with pytest.raises(ValueError) as e:
        PointCloudTokenizer.Config(**{field: value})
    assert str(e.value) == message


# ---- files --------------------------------------------------------------------------------------
def write_ply(path, vertices, faces=(), declared=None) -> str:
    """An ASCII PLY; ``declared`` overrides the header's vertex count (a truncated file)."""
    n = len(vertices) if declared is None else declared
    head = (
        f"ply\nformat ascii 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
    )
    if len(faces):
        head += f"element face {len(faces)}\nproperty list uchar int vertex_indices\n"
    body = "".join(f"{x} {y} {z}\n" for x, y, z in vertices)
    body += "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces)
    path.write_text(head + "end_header\n" + body)
    return str(path)


def read_error(tok, path) -> TokenizeError:
    with pytest.raises(TokenizeError) as e:
        tok.read(str(path))
    assert e.value.source == str(path)
    return e.value


def test_npz_corrupt_member_and_non_npy_member_are_corrupt(tmp_path):
    buf = io.BytesIO()
    np.savez_compressed(buf, points=cloud(3000))
    data = bytearray(buf.getvalue())
    data[200:260] = b"\x00" * 60  # the deflate stream, not the zip directory
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    e = read_error(PointCloudTokenizer(), tmp_path / "bad.npz")
    assert e.kind == "corrupt" and e.reason.startswith("not a readable .npz archive: ")
    import zipfile

    with zipfile.ZipFile(tmp_path / "bytes.npz", "w") as z:
        z.writestr("points.npy", b"not an npy file at all")
    e = read_error(PointCloudTokenizer(), tmp_path / "bytes.npz")
    assert (e.kind, e.reason) == ("corrupt", "member 'points' is not a .npy array")
    # a plain .npy under a .npz name is read as numpy itself reads it
    pts = cloud(40)
    with open(tmp_path / "plain.npz", "wb") as f:
        np.save(f, pts)
    np.testing.assert_array_equal(PointCloudTokenizer().read(str(tmp_path / "plain.npz")), pts)


def test_mesh_face_indices_out_of_range_are_corrupt(tmp_path):
    verts = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    path = write_ply(tmp_path / "oob.ply", verts, faces=[[0, 1, 2], [0, 1, 99]])
    e = read_error(PointCloudTokenizer(), path)
    assert (e.kind, e.reason) == ("corrupt", "face indices out of range: 99 is not in [0, 4)")
    ok = write_ply(tmp_path / "ok.ply", verts, faces=[[0, 1, 2], [0, 1, 3]])
    assert PointCloudTokenizer({"sample_points": 100}).read(ok).shape == (100, 3)


def test_truncated_ascii_ply_is_corrupt(tmp_path):
    pts = cloud(10)
    path = write_ply(tmp_path / "cut.ply", pts[:6], declared=10)
    e = read_error(PointCloudTokenizer(), path)
    assert (e.kind, e.reason) == ("corrupt", "header declares 10 vertices, the file holds 6 (truncated?)")
    whole = write_ply(tmp_path / "whole.ply", pts)
    np.testing.assert_allclose(PointCloudTokenizer().read(whole), pts, rtol=1e-6)


def test_bin_size_must_be_whole_points(tmp_path):
    (tmp_path / "17.bin").write_bytes(b"\x01" * 17)
    e = read_error(PointCloudTokenizer(), tmp_path / "17.bin")
    assert (e.kind, e.reason) == (
        "corrupt",
        "17 bytes is not a whole number of points of bin_columns=4 float32 values "
        "(16 bytes each; wrong column count or truncated?)",
    )
    (tmp_path / "stray.bin").write_bytes(cloud(50, channels=4).tobytes() + b"\x00\x01\x02")
    e = read_error(PointCloudTokenizer(), tmp_path / "stray.bin")
    assert e.kind == "corrupt" and e.reason.startswith("803 bytes is not a whole number of points")


def test_values_beyond_float32_range(tmp_path):
    pts = np.random.default_rng(0).uniform(-1, 1, (40, 3)) * 1e300
    pts[0, 0] = -2e300  # the largest magnitude
    np.save(tmp_path / "huge.npy", pts)
    reason = "values exceed float32's range (largest |value| 2e+300, float32 max 3.4e+38): no point is finite as float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered in cast"
        e = read_error(PointCloudTokenizer(), tmp_path / "huge.npy")
        assert (e.kind, e.reason) == ("invalid", reason)
        with pytest.raises(TokenizeError) as info:  # a float64 raw given to tokenize directly
            PointCloudTokenizer().tokenize(pts, source="raw")
        assert (info.value.kind, info.value.reason) == ("invalid", reason)
        # one such point among normal ones is dropped like a non-finite one
        one = cloud(40).astype(np.float64)
        one[3] = [1e300, 0, 0]
        np.save(tmp_path / "one.npy", one)
        [rec] = PointCloudTokenizer()(str(tmp_path / "one.npy"))
        assert rec.meta["dropped_nonfinite"] == 1 and rec.meta["num_valid_points"] == 39
        [direct] = PointCloudTokenizer().tokenize(one, source="one")
        assert direct.meta["dropped_nonfinite"] == 1 and np.isfinite(direct.tokens).all()


def test_stl_truncated_binary_is_corrupt_empty_stl_is_empty(tmp_path):
    (tmp_path / "cut.stl").write_bytes(b"\x00" * 80 + struct.pack("<I", 1000) + b"\x00" * 100)
    e = read_error(PointCloudTokenizer(), tmp_path / "cut.stl")
    assert (e.kind, e.reason) == (
        "corrupt",
        "not an ASCII STL, and as a binary STL its header declares 1000 triangles (50084 bytes) "
        "but the file has 184 bytes (truncated?)",
    )
    (tmp_path / "short.stl").write_bytes(b"hello")
    e = read_error(PointCloudTokenizer(), tmp_path / "short.stl")
    assert (e.kind, e.reason) == (
        "corrupt",
        "5 bytes: not an ASCII STL and shorter than a binary STL header (84 bytes)",
    )
    (tmp_path / "ascii.stl").write_text("solid empty\nendsolid empty\n")
    (tmp_path / "binary.stl").write_bytes(b"\x00" * 80 + struct.pack("<I", 0))
    for name in ("ascii.stl", "binary.stl"):
        e = read_error(PointCloudTokenizer(), tmp_path / name)
        assert (e.kind, e.reason) == ("empty", "file holds no vertices"), name


def test_read_npy_npz_xyz_bin(tmp_path):
    tok = PointCloudTokenizer()
    pts = cloud(50, channels=4)
    np.save(tmp_path / "a.npy", pts)
    np.testing.assert_array_equal(tok.read(str(tmp_path / "a.npy")), pts)
    np.savez(tmp_path / "a.npz", labels=np.zeros(3), points=pts)
    np.testing.assert_array_equal(tok.read(str(tmp_path / "a.npz")), pts)
    (tmp_path / "a.xyz").write_text("# x y z\n1 2 3\n4,5,6\n\n7\t8 9  # trailing comment\n")
    np.testing.assert_array_equal(tok.read(str(tmp_path / "a.xyz")), [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    pts.tofile(tmp_path / "a.bin")
    np.testing.assert_array_equal(tok.read(str(tmp_path / "a.bin")), pts)
    np.testing.assert_array_equal(
        PointCloudTokenizer({"bin_columns": 2 * 4}).read(str(tmp_path / "a.bin")), pts.reshape(25, 8)
    )
    with pytest.raises(TokenizeError) as e:
        PointCloudTokenizer({"bin_columns": 3}).read(str(tmp_path / "a.bin"))  # 200 values
    assert e.value.kind == "corrupt" and "bin_columns=3" in e.value.reason


def test_read_ply_point_cloud_with_colours(tmp_path):
    pts = cloud(40)
    colours = np.tile(np.array([[10, 20, 30, 255]], np.uint8), (40, 1))
    trimesh.PointCloud(pts, colors=colours).export(tmp_path / "c.ply")
    raw = PointCloudTokenizer().read(str(tmp_path / "c.ply"))
    assert raw.shape == (40, 6)
    np.testing.assert_allclose(raw[:, :3], pts, rtol=1e-6)
    np.testing.assert_array_equal(raw[:, 3:], np.tile([10, 20, 30], (40, 1)))
    [rec] = PointCloudTokenizer({"extra_channels": 3, "num_points": 64, "num_groups": 4}).tokenize(
        raw, source="c"
    )
    assert rec.tokens.shape == (4, 32 * 6)
    trimesh.PointCloud(pts).export(tmp_path / "plain.ply")
    assert PointCloudTokenizer().read(str(tmp_path / "plain.ply")).shape == (40, 3)


@pytest.mark.parametrize("ext", [".ply", ".off", ".stl", ".obj"])
def test_mesh_is_surface_sampled_with_a_seed(tmp_path, ext):
    trimesh.creation.box(extents=(2, 2, 2)).export(tmp_path / f"box{ext}")
    tok = PointCloudTokenizer({"sample_points": 500})
    a, b = tok.read(str(tmp_path / f"box{ext}")), tok.read(str(tmp_path / f"box{ext}"))
    assert a.shape == (500, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # every sample lies on the surface of the cube [-1, 1]^3
    np.testing.assert_allclose(np.abs(a).max(axis=1), 1.0, atol=1e-5)
    c = PointCloudTokenizer({"sample_points": 500, "seed": 3}).read(str(tmp_path / f"box{ext}"))
    assert not np.array_equal(a, c)


def test_bad_files(tmp_path):
    tok = PointCloudTokenizer()
    (tmp_path / "empty.xyz").write_text("")
    (tmp_path / "comments.xyz").write_text("# nothing\n\n")
    (tmp_path / "ragged.xyz").write_text("1 2 3\n4 5\n")
    (tmp_path / "words.xyz").write_text("a b c\n")
    (tmp_path / "two.xyz").write_text("1 2\n3 4\n")
    np.save(tmp_path / "obj.npy", np.array(["a", "b"]))
    np.save(tmp_path / "flat.npy", np.zeros(9, np.float32))
    expected = {
        "missing.xyz": "missing",
        "empty.xyz": "empty",
        "comments.xyz": "empty",
        "ragged.xyz": "corrupt",
        "words.xyz": "corrupt",
        "two.xyz": "invalid",
        "obj.npy": "invalid",
        "flat.npy": "invalid",
        "x.las": "unsupported",
    }
    (tmp_path / "x.las").write_bytes(b"abc")
    for name, kind in expected.items():
        with pytest.raises(TokenizeError) as e:
            tok(str(tmp_path / name))
        assert e.value.kind == kind, (name, e.value)
        assert name in e.value.source


def test_render_writes_png(tmp_path):
    PointCloudTokenizer().render(cloud(100), str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conformance(tmp_path):
    np.save(tmp_path / "a.npy", cloud(300, seed=1))
    np.savetxt(tmp_path / "b.xyz", cloud(100, seed=2))
    cloud(70, seed=3, channels=4).tofile(tmp_path / "c.bin")
    trimesh.creation.icosphere(subdivisions=1).export(tmp_path / "d.ply")
    sources = [str(tmp_path / n) for n in ("a.npy", "b.xyz", "c.bin", "d.ply")]
    tok = PointCloudTokenizer({"num_points": 256, "num_groups": 16, "group_size": 16, "sample_points": 400})

    def compare(raw, out, rec):
        assert out.shape == (16 * 16, 3)
        assert nearest_dist(out, raw[:, :3]).max() < 1e-4, rec.source

    report = check_tokenizer(tok, sources, compare=compare)
    assert report == {"sources": 4, "records": 4, "tokens": 64}


def test_a_bin_file_of_integers_is_not_a_cloud(tmp_path):
    """ScanNet's and S3DIS's semantic_mask.bin (int64) read as float32 gave a cloud of subnormals."""
    np.arange(100, dtype=np.int64).tofile(tmp_path / "semantic_mask.bin")
    with pytest.raises(TokenizeError) as e:
        PointCloudTokenizer()(str(tmp_path / "semantic_mask.bin"))
    assert e.value.kind == "invalid" and "no float32 points (integers" in e.value.reason
    np.zeros((64, 4), np.float32).tofile(tmp_path / "zeros.bin")  # all zeros: no points either
    with pytest.raises(TokenizeError, match="float32 subnormal"):
        PointCloudTokenizer()(str(tmp_path / "zeros.bin"))
    scan = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    scan.tofile(tmp_path / "scan.bin")
    assert len(PointCloudTokenizer()(str(tmp_path / "scan.bin"))) == 1


def test_a_lidar_ply_gives_its_intensity_as_the_extra_channel(tmp_path):
    """An intensity-only PLY was a config error with extra_channels=1 ("the input has 3")."""
    pts = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    pts[:, 3] = np.arange(64) / 64  # intensity
    head = (
        "ply\nformat binary_little_endian 1.0\nelement vertex 64\nproperty float x\nproperty float y\n"
        "property float z\nproperty float intensity\nend_header\n"
    )
    (tmp_path / "scan.ply").write_bytes(head.encode() + pts.tobytes())
    tok = PointCloudTokenizer({"num_points": 64, "num_groups": 8, "group_size": 8, "extra_channels": 1})
    assert tok.read(str(tmp_path / "scan.ply")).tolist() == pts.astype(np.float64).tolist()
    (rec,) = tok(str(tmp_path / "scan.ply"))
    got = tok.detokenize(rec)  # (G * K, 4): xyz back in the file's frame, intensity as it was
    assert set(np.round(got[:, 3], 6)) <= set(np.round(pts[:, 3], 6))
    assert (
        len(
            PointCloudTokenizer({"num_points": 64, "num_groups": 8, "group_size": 8})(
                str(tmp_path / "scan.ply")
            )
        )
        == 1
    )


def test_a_coloured_ply_with_intensity_gives_colours_then_intensity(tmp_path):
    """r, g, b, intensity: extra_channels=4 keeps all four (was a config error: "the input has 6"),
    3 the colours, as before."""
    rng = np.random.default_rng(2)
    xyz = rng.normal(size=(64, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (64, 3)).astype(np.uint8)
    inten = (np.arange(64) / 64).astype(np.float32)
    rows = np.zeros(64, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                         ("blue", "u1"), ("intensity", "<f4")])  # fmt: skip
    for k, name in enumerate("xyz"):
        rows[name] = xyz[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        rows[name] = rgb[:, k]
    rows["intensity"] = inten
    head = (
        "ply\nformat binary_little_endian 1.0\nelement vertex 64\nproperty float x\nproperty float y\n"
        "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
        "property float intensity\nend_header\n"
    )
    (tmp_path / "scan.ply").write_bytes(head.encode() + rows.tobytes())
    small = {"num_points": 64, "num_groups": 8, "group_size": 8}
    raw = PointCloudTokenizer({**small, "extra_channels": 4}).read(str(tmp_path / "scan.ply"))
    assert raw.shape == (64, 7)
    np.testing.assert_array_equal(raw[:, :3], xyz)
    np.testing.assert_array_equal(raw[:, 3:6], rgb.astype(np.float32))
    np.testing.assert_array_equal(raw[:, 6], inten)
    (rec4,) = PointCloudTokenizer({**small, "extra_channels": 4})(str(tmp_path / "scan.ply"))
    (rec3,) = PointCloudTokenizer({**small, "extra_channels": 3})(str(tmp_path / "scan.ply"))
    t4, t3 = rec4.tokens.reshape(8, 8, 7), rec3.tokens.reshape(8, 8, 6)
    np.testing.assert_array_equal(t4[..., :6], t3)  # the same groups; the intensity after the colours
    assert set(np.round(t4[..., 6].ravel(), 6)) <= set(np.round(inten, 6))


# ---- WebDataset tar shards -----------------------------------------------------------------------
def test_tar_samples_give_the_records_of_the_same_files(tmp_path, caplog):
    """A tar of .npy / .ply / .off / .bin / .xyz members (ShapeNet- or LiDAR-style shards): each sample
    gives the record its file gives alone, id <tar>#<key>, its cls label, meta["member"]; a sample
    too small to tokenize is skipped with one warning, not the whole tar; read + tokenize agree."""
    import logging
    import tarfile

    rng = np.random.default_rng(3)
    files = tmp_path / "files"
    files.mkdir()
    np.save(files / "a.npy", rng.normal(size=(300, 4)).astype(np.float32))
    pts = rng.normal(size=(200, 3)).astype(np.float32)
    head = "ply\nformat binary_little_endian 1.0\nelement vertex 200\nproperty float x\nproperty float y\n"
    (files / "b.ply").write_bytes((head + "property float z\nend_header\n").encode() + pts.tobytes())
    trimesh.creation.icosphere().export(files / "c.off")
    rng.normal(size=(150, 4)).astype(np.float32).tofile(files / "d.bin")
    (files / "e.xyz").write_text("\n".join(f"{x},{y},{z}" for x, y, z in rng.normal(size=(100, 3))))
    np.save(files / "f.npy", rng.normal(size=(5, 3)).astype(np.float32))  # fewer points than a group
    labels = {"a": 2, "b": 0, "c": None, "d": 1, "e": 7, "f": 3}
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as tf:
        for f in sorted(files.iterdir()):
            key = f"objs/{f.stem}"
            tf.add(f, arcname=f"{key}{f.suffix}")
            if labels[f.stem] is not None:
                data = str(labels[f.stem]).encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tok = PointCloudTokenizer({"num_points": 64, "num_groups": 8, "group_size": 16})
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.point_cloud"):
        recs = list(tok.iter_records(str(tar)))
    assert [r.id for r in recs] == [f"{tar}#objs/{k}" for k in "abcde"]
    assert [r.label for r in recs] == [2, 0, None, 1, 7]
    assert [r.meta["member"] for r in recs] == [
        "objs/a.npy",
        "objs/b.ply",
        "objs/c.off",
        "objs/d.bin",
        "objs/e.xyz",
    ]
    for r, f in zip(recs, sorted(files.iterdir())):
        (alone,) = tok(str(f))
        np.testing.assert_array_equal(r.tokens, alone.tokens)
        np.testing.assert_array_equal(r.positions, alone.positions)
        assert {k: v for k, v in r.meta.items() if k != "member"} == alone.meta and r.source == str(tar)
    assert [m.getMessage() for m in caplog.records] == [
        f"{tar}: skipped 1 of 6 samples: objs/f (too_small: 5 valid points, fewer than group_size=16)"
    ]
    whole = tok.tokenize(tok.read(str(tar)), source=str(tar))
    assert [r.id for r in whole] == [r.id for r in recs]
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(whole, recs))
    # a tar of clouds all too small is one error row, not an empty success
    with tarfile.open(tmp_path / "tiny.tar", "w") as tf:
        tf.add(files / "f.npy", arcname="f.npy")
    with pytest.raises(TokenizeError) as e:
        list(tok.iter_records(str(tmp_path / "tiny.tar")))
    assert (e.value.kind, e.value.reason) == (
        "too_small",
        "sample f: 5 valid points, fewer than group_size=16 (1 of 1 samples are unusable)",
    )
