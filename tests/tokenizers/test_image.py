"""Image tokenizer: exact patches and positions, round trip, decoding of every Pillow mode, bad inputs."""

import dataclasses
import gzip
import io
import itertools
import logging
import pickle
import tarfile

import numpy as np
import pytest
from einops import rearrange
from PIL import Image

from maskloom import tables
from maskloom.testing import _same_record, write_tar
from maskloom.tokenizers import TOKENIZERS, TokenizeError, get_tokenizer
from maskloom.tokenizers.image import (
    ImageConfig,
    ImageTokenizer,
    TarImage,
    TarImages,
    grid_positions,
    patchify,
    resize_shorter_center_crop,
)


def _tok(**kw) -> ImageTokenizer:
    return ImageTokenizer(ImageConfig(**kw))


def _ramp(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 where every pixel is distinct enough to locate: R=row, G=col, B=(row+col)%256."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([r % 256, c % 256, (r + c) % 256], axis=-1).astype(np.uint8)


def test_registered_and_spec():
    assert TOKENIZERS.get("image") is ImageTokenizer
    spec = get_tokenizer("image").spec()
    assert spec.modality == "image"
    assert (spec.token_kind, spec.token_dim, spec.token_dtype) == ("continuous", 768, "uint8")
    assert spec.position_axes == ("row", "col") and spec.position_kind == "grid"
    assert spec.token_shape == (16, 16, 3)
    assert get_tokenizer("image", {"patch_size": 8, "image_size": 32}).spec().token_dim == 192


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ImageConfig(image_size=30, patch_size=16)
    with pytest.raises(ValueError, match="interpolation"):
        ImageConfig(interpolation="cubic-ish")
    with pytest.raises(ValueError, match="positive"):
        ImageConfig(patch_size=0)
    with pytest.raises(ValueError, match="unknown key"):
        get_tokenizer("image", {"size": 32})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ImageConfig().image_size = 3  # type: ignore[misc]


def test_wide_image_gives_four_tokens_from_centre_crop():
    img = _ramp(32, 48)  # H=32, W=48: shorter side already 32, so only a centre crop (cols 8..39)
    (rec,) = _tok(image_size=32).tokenize(img, source="a.png")
    assert rec.id == "a.png#0" and rec.source == "a.png"
    assert rec.tokens.shape == (4, 768) and rec.tokens.dtype == np.uint8
    assert rec.positions.dtype == np.float32
    assert rec.positions.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # token k = patch (row, col); inside it, the value order is (p1, p2, c)
    patches = rec.tokens.reshape(4, 16, 16, 3)
    # top-left pixel of patch (0, 1) is image pixel (0, 8 + 16) -> R=0, G=24, B=24
    assert patches[1, 0, 0].tolist() == [0, 24, 24]
    # pixel (5, 7) inside patch (1, 0) is image pixel (21, 8 + 7) -> R=21, G=15, B=36
    assert patches[2, 5, 7].tolist() == [21, 15, 36]
    np.testing.assert_array_equal(patches[3], img[16:32, 24:40])
    assert rec.meta == {
        "original_size": [32, 48],
        "resized_size": [32, 48],
        "crop_offset": [0, 8],
        "processed_size": [32, 32],
        "patch_size": 16,
        "grid": [2, 2],
    }


def test_tall_image_and_token_order():
    img = _ramp(64, 32)  # rows 16..47 are kept
    (rec,) = _tok(image_size=32, patch_size=8).tokenize(img)
    assert rec.tokens.shape == (16, 192)
    assert rec.positions[:5].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    patches = rec.tokens.reshape(4, 4, 8, 8, 3)  # (row, col, p1, p2, c)
    np.testing.assert_array_equal(patches[2, 1], img[16 + 16 : 16 + 24, 8:16])


def test_resize_shorter_side_then_crop():
    img = np.zeros((20, 40, 3), np.uint8)
    (rec,) = _tok(image_size=32, interpolation="nearest").tokenize(img)
    assert rec.meta["resized_size"] == [32, 64] and rec.meta["crop_offset"] == [0, 16]
    (rec,) = _tok(image_size=32).tokenize(np.zeros((101, 77, 3), np.uint8))
    assert rec.meta["resized_size"] == [42, 32] and rec.meta["crop_offset"] == [5, 0]
    assert rec.meta["original_size"] == [101, 77]


def test_nearest_upscale_exact_values():
    img = np.zeros((16, 16, 3), np.uint8)
    img[:8, :8] = [10, 20, 30]
    image, _ = _tok(image_size=32, interpolation="nearest").preprocess(img)
    assert image.shape == (32, 32, 3)
    assert image[:16, :16].reshape(-1, 3).tolist() == [[10, 20, 30]] * 256
    assert image[16:, :].max() == 0 and image[:, 16:].max() == 0


def test_round_trip_is_exact_and_order_free():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    tok = _tok(image_size=32)
    processed, _ = tok.preprocess(img)
    (rec,) = tok.tokenize(img)
    np.testing.assert_array_equal(tok.detokenize(rec), processed)
    # shuffled tokens still land at their positions; a subset leaves the rest black
    perm = rng.permutation(4)
    shuffled = dataclasses.replace(rec, tokens=rec.tokens[perm], positions=rec.positions[perm])
    np.testing.assert_array_equal(tok.detokenize(shuffled), processed)
    part = dataclasses.replace(rec, tokens=rec.tokens[:1], positions=rec.positions[:1])
    out = tok.detokenize(part)
    np.testing.assert_array_equal(out[:16, :16], processed[:16, :16])
    assert out[16:].max() == 0 and out[:, 16:].max() == 0
    # float predictions are rounded and clipped
    pred = dataclasses.replace(rec, tokens=rec.tokens.astype(np.float32) + 0.3)
    np.testing.assert_array_equal(tok.detokenize(pred), processed)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 100), (100, 3), (31, 33), (64, 64), (500, 200)])
def test_any_size_gives_the_full_grid(h, w):
    img = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    tok = _tok(image_size=32, patch_size=8)
    (rec,) = tok.tokenize(img)
    assert rec.tokens.shape == (16, 192) and rec.meta["original_size"] == [h, w]
    assert min(rec.meta["resized_size"]) == 32
    np.testing.assert_array_equal(tok.detokenize(rec), tok.preprocess(img)[0])


def test_round_trip_through_table(tmp_path):
    tok = _tok(image_size=32)
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    recs = tok.tokenize(img, source="x.png")
    table = tables.write_table(str(tmp_path / "t"), recs, tok)
    (back,) = table.records()
    np.testing.assert_array_equal(table.tokenizer().detokenize(back), img)


def test_caller_data_not_mutated_and_deterministic():
    img = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    copy = img.copy()
    tok = _tok(image_size=32)
    a = tok.tokenize(img)[0]
    b = pickle.loads(pickle.dumps(tok)).tokenize(img)[0]
    np.testing.assert_array_equal(img, copy)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.positions, b.positions)


def test_tokenize_rejects_bad_arrays():
    tok = _tok(image_size=32)
    for bad in (
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        "img",
    ):
        with pytest.raises(TokenizeError) as e:
            tok.tokenize(bad, source="s")
        assert e.value.kind == "invalid"
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(np.zeros((0, 5, 3), np.uint8))
    assert e.value.kind == "empty"


# ---- read: formats and modes ---------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".webp"])
def test_read_lossless_formats(tmp_path, ext):
    img = _ramp(12, 20)
    path = tmp_path / f"a{ext}"
    Image.fromarray(img).save(path, **({"lossless": True} if ext == ".webp" else {}))
    out = _tok().read(str(path))
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, img)


def test_read_jpeg(tmp_path):
    img = np.full((16, 24, 3), [200, 100, 50], np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    out = _tok().read(str(tmp_path / "a.jpg"))
    assert out.shape == (16, 24, 3)
    assert np.abs(out.astype(int) - img).max() <= 3


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth test photo with sensor-like noise."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = np.stack([np.sin(c / 9.0) * 100 + 128, np.cos(r / 7.0) * 100 + 128, (r + c) % 256], -1)
    noise = np.random.default_rng(seed).integers(-10, 11, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def test_large_jpegs_decode_at_a_dct_scale_to_nearly_the_same_tokens(tmp_path):
    """A JPEG whose shorter side is >= 4 S decodes at the largest DCT scale keeping it >= 2 S (here
    S = 32: 300x400 -> 1/4 -> 75x100), ~4x faster for phone photos; the tokens stay within a few
    levels of the full decode's, and the meta keeps the file's own size."""
    Image.fromarray(_photo(300, 400)).save(tmp_path / "big.jpg", quality=92)
    path = str(tmp_path / "big.jpg")
    (fast,), (full,) = _tok(image_size=32)(path), _tok(image_size=32, jpeg_draft=False)(path)
    assert fast.meta["original_size"] == full.meta["original_size"] == [300, 400]
    assert fast.meta["decoded_size"] == [75, 100] and "decoded_size" not in full.meta
    assert np.array_equal(
        full.tokens, _tok(image_size=32).tokenize(np.asarray(Image.open(path)), source=path)[0].tokens
    )
    diff = np.abs(fast.tokens.astype(int) - full.tokens.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 4  # 0.51 and 2 here
    # just under 4 S: decoded in full, the same tokens
    Image.fromarray(_photo(127, 400)).save(tmp_path / "under.jpg", quality=92)
    (a,), (b,) = (_tok(image_size=32, jpeg_draft=d)(str(tmp_path / "under.jpg")) for d in (True, False))
    assert np.array_equal(a.tokens, b.tokens) and a.meta == b.meta
    # EXIF-rotated: the file's size as it stands upright
    pil = Image.fromarray(_photo(300, 400))
    exif = pil.getexif()
    exif[0x0112] = 6
    pil.save(tmp_path / "rot.jpg", exif=exif, quality=92)
    (rot,) = _tok(image_size=32)(str(tmp_path / "rot.jpg"))
    assert rot.meta["original_size"] == [400, 300] and rot.meta["decoded_size"] == [100, 75]
    with pytest.raises(ValueError, match="jpeg_draft must be true or false"):
        _tok(jpeg_draft="yes")


def test_exif_orientation_applied(tmp_path):
    img = np.zeros((10, 20, 3), np.uint8)  # landscape, marker at the top-left
    img[0, 0] = [255, 0, 0]
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    pil.save(tmp_path / "r.png", exif=exif)
    out = _tok().read(str(tmp_path / "r.png"))
    assert out.shape == (20, 10, 3)  # now portrait
    assert out[0, -1].tolist() == [255, 0, 0]  # top-left went to the top-right
    assert int(out.sum()) == 255


def test_grayscale_and_bilevel(tmp_path):
    grey = np.array([[0, 7, 128, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = _tok().read(str(tmp_path / "g.png"))
    assert out.tolist() == [[[0, 0, 0], [7, 7, 7], [128, 128, 128], [255, 255, 255]]]
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert _tok().read(str(tmp_path / "b.png")).tolist() == [[[255] * 3, [0] * 3]]


def test_rgba_composited_on_white(tmp_path):
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [100, 0, 200, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = _tok().read(str(tmp_path / "a.png"))
    # round((c*a + 255*(255-a)) / 255): opaque keeps colour, transparent is white
    assert out.tolist() == [[[10, 20, 30], [255, 255, 255], [177, 127, 227]]]
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert _tok().read(str(tmp_path / "la.png")).tolist() == [[[255] * 3, [50] * 3]]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2])
    p.save(tmp_path / "p.png")
    assert _tok().read(str(tmp_path / "p.png")).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    p.save(tmp_path / "pt.png", transparency=1)  # index 1 fully transparent
    assert Image.open(tmp_path / "pt.png").mode == "P"
    assert _tok().read(str(tmp_path / "pt.png")).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, ext):
    v = np.array([[0, 257, 32768, 65535, 1000]], np.uint16)
    Image.fromarray(v).save(tmp_path / f"g{ext}")
    assert Image.open(tmp_path / f"g{ext}").mode.startswith("I;16")
    out = _tok().read(str(tmp_path / f"g{ext}"))
    # round(v * 255 / 65535): 1000 -> 3.89 -> 4
    assert out[..., 0].tolist() == [[0, 1, 128, 255, 4]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32bit_int_and_float_modes(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert _tok().read(str(tmp_path / "i.tif"))[..., 0].tolist() == [[0, 255]]
    Image.fromarray(np.array([[-10, 0, 90]], np.int32)).save(tmp_path / "wide.tif")  # stretched min..max
    assert _tok().read(str(tmp_path / "wide.tif"))[..., 0].tolist() == [[0, 26, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    assert _tok().read(str(tmp_path / "f.tif"))[..., 0].tolist() == [[0, 128, 255]]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    out = _tok().read(str(tmp_path / "c.jpg"))
    assert out.shape == (4, 4, 3) and out.min() >= 250  # no ink = white


# ---- bad inputs ----------------------------------------------------------------------------------
def _kind(tmp_path, name: str, data: bytes | None) -> str:
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(TokenizeError) as e:
        _tok()(str(path))
    assert e.value.source == str(path)
    return e.value.kind


def test_bad_inputs(tmp_path):
    assert _kind(tmp_path, "missing.png", None) == "missing"
    assert _kind(tmp_path, "empty.jpg", b"") == "empty"
    assert _kind(tmp_path, "garbage.png", bytes(range(256)) * 3) == "corrupt"
    assert _kind(tmp_path, "notes.txt", b"hello") == "unsupported"
    # a PCX with an image extension: decodable, but not a format this tokenizer reads
    Image.new("RGB", (4, 4)).save(tmp_path / "g.pcx")
    assert _kind(tmp_path, "pcx.png", (tmp_path / "g.pcx").read_bytes()) == "unsupported"
    (tmp_path / "dir.png").mkdir()
    assert _kind(tmp_path, "dir.png", None) == "unsupported"


def test_gif_avif_netpbm_and_jfif_are_read(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    first, second = Image.fromarray(a), Image.fromarray(255 - a)
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(tmp_path / "anim.gif") as im:
        assert im.n_frames == 2
        want = np.array(im.convert("RGB"))  # frame 0 as quantised to GIF's 256-colour palette
    tok = _tok()
    np.testing.assert_array_equal(tok.read(str(tmp_path / "anim.gif")), want)  # the first frame only
    # a palette GIF with a transparent index: composited on white
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 2), 1)
    p.save(tmp_path / "t.gif", transparency=0)
    t = tok.read(str(tmp_path / "t.gif"))
    assert t[2, 1].tolist() == [200, 100, 50] and (t.sum(axis=2) == 765).sum() == 15
    Image.fromarray(a).save(tmp_path / "c.ppm")
    np.testing.assert_array_equal(tok.read(str(tmp_path / "c.ppm")), a)  # lossless
    Image.fromarray(a[..., 0]).save(tmp_path / "g.pgm")
    np.testing.assert_array_equal(tok.read(str(tmp_path / "g.pgm")), np.repeat(a[..., :1], 3, axis=2))
    Image.fromarray(np.full((3, 5), 65535, np.uint16)).save(tmp_path / "w16.pgm")  # 16-bit PGM: scaled
    assert (tok.read(str(tmp_path / "w16.pgm")) == 255).all()
    Image.fromarray(a[..., 0] > 127).save(tmp_path / "b.pbm")
    np.testing.assert_array_equal(
        tok.read(str(tmp_path / "b.pbm"))[..., 0], np.where(a[..., 0] > 127, 255, 0)
    )
    y, x = np.mgrid[0:40, 0:48]
    smooth = np.stack([y * 6, x * 5, (x + y) * 2], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "j.jfif", format="JPEG", quality=95)
    Image.fromarray(smooth).save(tmp_path / "x.avif", quality=95)
    for name in ("j.jfif", "x.avif"):  # lossy: near the pixels
        got = tok.read(str(tmp_path / name))
        assert got.shape == a.shape and np.abs(got.astype(int) - smooth).mean() < 3
    assert {".gif", ".avif", ".jfif", ".jpe", ".pgm", ".ppm", ".pbm", ".pnm"} <= set(tok.extensions)


def test_heic_photos_are_read_with_pillow_heif(tmp_path):
    pytest.importorskip("pillow_heif")
    from maskloom.tokenizers.image import _heif_opener

    assert _heif_opener()
    y, x = np.mgrid[0:40, 0:48]
    smooth = np.stack([y * 6, x * 5, (x + y) * 2], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "p.heic", quality=95)
    got = _tok().read(str(tmp_path / "p.heic"))
    assert got.shape == smooth.shape and np.abs(got.astype(int) - smooth).mean() < 3
    (tmp_path / "cut.heic").write_bytes((tmp_path / "p.heic").read_bytes()[:200])
    assert _kind(tmp_path, "cut.heic", None) == "corrupt"


def test_heic_without_pillow_heif_is_an_unsupported_row_saying_so(tmp_path, monkeypatch):
    import maskloom.tokenizers.image as image_mod

    monkeypatch.setattr(image_mod, "_heif_opener", lambda: False)
    (tmp_path / "p.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    with pytest.raises(TokenizeError) as e:
        _tok()(str(tmp_path / "p.heic"))
    assert (e.value.kind, e.value.reason) == (
        "unsupported",
        "HEIC/HEIF images need pillow-heif: pip install 'maskloom[heif]'",
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_corrupt(tmp_path, fmt):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full", format=fmt)
    data = (tmp_path / "full").read_bytes()
    assert _kind(tmp_path, "cut.png" if fmt == "PNG" else "cut.jpg", data[: len(data) // 2]) == "corrupt"


def test_render_writes_png(tmp_path):
    img = _ramp(20, 30)
    tok = _tok()
    tok.render(img, str(tmp_path / "r.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r.png")), img)


def test_conformance_kit(tmp_path):
    testing = pytest.importorskip("maskloom.testing")
    rng = np.random.default_rng(4)
    paths = []
    for i, (ext, shape) in enumerate([(".png", (40, 32, 3)), (".bmp", (32, 70, 3)), (".jpg", (33, 33, 3))]):
        p = str(tmp_path / f"im{i}{ext}")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(p)
        paths.append(p)
    tok = _tok(image_size=32)

    def compare(raw, out, rec):
        np.testing.assert_array_equal(out, tok.preprocess(raw)[0])

    report = testing.check_tokenizer(tok, paths, compare=compare)
    assert report == {"sources": 3, "records": 3, "tokens": 12}


# ---- fast paths: the same values as the plain einops / meshgrid formulation ----------------------
@pytest.mark.parametrize(("size", "p"), [(32, 16), (16, 16), (48, 8), (32, 32), (224, 16)])
def test_patchify_equals_einops_and_never_aliases_the_image(size, p):
    img = np.random.default_rng(size + p).integers(0, 256, (size, size, 3), dtype=np.uint8)
    tokens = patchify(img, p)
    expected = rearrange(img, "(h p1) (w p2) c -> (h w) (p1 p2 c)", p1=p, p2=p)
    assert tokens.shape == ((size // p) ** 2, p * p * 3) and tokens.flags.c_contiguous
    np.testing.assert_array_equal(tokens, expected)
    assert not np.shares_memory(tokens, img)  # even a single patch (a contiguous view) is copied


def test_native_size_tokens_are_a_copy_of_the_caller_array():
    img = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)  # no resize, no crop
    (rec,) = _tok(image_size=16).tokenize(img)
    np.testing.assert_array_equal(rec.tokens.reshape(16, 16, 3), img)
    rec.tokens[:] = 0  # writing the record's tokens must not touch the caller's image
    assert img.max() > 0
    crop, _ = resize_shorter_center_crop(img, 16, "bicubic")
    assert not np.shares_memory(crop, img) and crop.flags.writeable


def test_grid_positions_are_fresh_arrays():
    a = grid_positions(2, 3)
    assert a.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]] and a.dtype == np.float32
    a[:] = -1  # callers own what they get: the cached lattice is not affected
    b = grid_positions(2, 3)
    assert b[5].tolist() == [1, 2] and b.flags.writeable and not np.shares_memory(a, b)
    assert grid_positions(2, 2, 2).tolist()[:3] == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    tok = _tok(image_size=32)
    img = np.zeros((32, 32, 3), np.uint8)
    r1, r2 = tok.tokenize(img)[0], tok.tokenize(img)[0]
    assert not np.shares_memory(r1.positions, r2.positions)


def test_only_the_crop_is_resampled_and_matches_the_whole_resize():
    """bilinear and hamming resample the crop's source region only (Pillow's box): the same pixels
    as resizing the whole image and cropping, up to rounding (+-1; on these small random images in
    up to a quarter of the values); the other filters resize the whole image, so those match exactly."""
    from PIL import Image

    from maskloom.tokenizers.image import resample_filter

    rng = np.random.default_rng(7)
    for h, w, size in [(101, 77, 32), (256, 340, 224), (20, 40, 32), (48, 30, 16)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for interp in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"):
            crop, facts = resize_shorter_center_crop(img, size, interp)
            (rh, rw), (top, left) = facts["resized_size"], facts["crop_offset"]
            whole = np.asarray(Image.fromarray(img).resize((rw, rh), resample_filter(interp)))
            expected = whole[top : top + size, left : left + size]
            assert crop.shape == (size, size, 3) and crop.flags.writeable and crop.flags.c_contiguous
            diff = np.abs(crop.astype(int) - expected)
            if interp in ("bilinear", "hamming"):
                assert diff.max() <= 1 and diff.mean() < 0.3, (h, w, interp)
            else:
                np.testing.assert_array_equal(crop, expected)


# ---- WebDataset tar shards -----------------------------------------------------------------------
def _encoded(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image_members(n: int, seed: int = 0, folder: str = "n01") -> list[tuple[str, bytes]]:
    """n samples ``<folder>/s<i>``: a PNG (40 x 50 + i) and a ``cls`` holding i."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (40, 50 + i, 3), dtype=np.uint8)
        out += [(f"{folder}/s{i}.png", _encoded(img, "PNG")), (f"{folder}/s{i}.cls", f"{i}\n".encode())]
    return out


def test_tar_shards_are_inputs():
    tok = _tok()
    assert {".tar", ".tar.gz", ".tgz"} <= set(tok.extensions)
    from maskloom.tokenizers.image import IMAGE_EXTENSIONS

    assert tok.extensions == (*IMAGE_EXTENSIONS, ".tar", ".tar.gz", ".tgz")


def test_tar_samples_give_the_records_of_the_same_files(tmp_path):
    """A sample's record is the record of its image as a file (pixel for pixel, meta), with the id
    ``<tar>#<key>``, the ``cls`` label and the member's name; JPEG draft and EXIF apply as to files."""
    photo = _photo(300, 400)
    rot = Image.fromarray(_photo(60, 80, seed=1))
    exif = rot.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rot.save(buf, format="JPEG", exif=exif, quality=90)
    files = {
        "a.png": _encoded(_ramp(40, 57), "PNG"),
        "b.jpg": _encoded(photo, "JPEG", quality=92),  # >= 4 S: decoded at a DCT scale
        "c.jpeg": buf.getvalue(),  # EXIF-rotated
        "d.webp": _encoded(_ramp(33, 20), "WEBP", lossless=True),
    }
    members = []
    for i, (name, data) in enumerate(files.items()):
        (tmp_path / name).write_bytes(data)
        key = f"./train/{name.split('.')[0]}"
        members += [(f"{key}.{name.split('.')[1].upper()}", data), (f"{key}.cls", b" %d\n" % (7 - i))]
        members.append((f"{key}.json", b"{}"))
    tar = write_tar(tmp_path / "shard-000.tar", members)
    tok = _tok(image_size=32)
    recs = tok(tar)
    assert [r.id for r in recs] == [f"{tar}#train/a", f"{tar}#train/b", f"{tar}#train/c", f"{tar}#train/d"]
    assert [r.label for r in recs] == [7, 6, 5, 4]
    assert [r.meta["member"] for r in recs] == [
        "./train/a.PNG",
        "./train/b.JPG",
        "./train/c.JPEG",
        "./train/d.WEBP",
    ]
    assert all(r.source == tar for r in recs)
    for rec, name in zip(recs, files, strict=True):
        (want,) = tok(str(tmp_path / name))
        np.testing.assert_array_equal(rec.tokens, want.tokens)
        np.testing.assert_array_equal(rec.positions, want.positions)
        assert rec.meta == {**want.meta, "member": rec.meta["member"]}
    assert recs[1].meta["decoded_size"] == [75, 100] and recs[2].meta["original_size"] == [80, 60]
    # read() gives the samples decoded; tokenize() of it the same records; iter_records streams them
    raw = tok.read(tar)
    assert isinstance(raw, TarImages) and [s.key for s in raw] == ["train/a", "train/b", "train/c", "train/d"]
    assert raw[0] == TarImage("train/a", raw[0].image, 7, "./train/a.PNG")
    np.testing.assert_array_equal(raw[0].image, tok.read(str(tmp_path / "a.png")))
    streamed = tok.iter_records(tar)
    assert not isinstance(streamed, list)
    assert all(map(_same_record, recs, list(streamed))) and len(recs) == 4
    assert all(map(_same_record, recs, tok.tokenize(raw, source=tar)))
    # gzipped: the same samples
    (tmp_path / "shard-000.tar.gz").write_bytes(gzip.compress(open(tar, "rb").read()))
    gz = str(tmp_path / "shard-000.tar.gz")
    assert [(r.id, r.label) for r in tok(gz)] == [(r.id.replace(tar, gz), r.label) for r in recs]


def test_cls_labels(tmp_path):
    png = _encoded(_ramp(20, 20), "PNG")
    members = [("a.png", png), ("a.cls", b"12"), ("b.png", png), ("b.cls", b"\t3 \r\n"),
               ("c.png", png), ("d.png", png), ("d.cls", b"-1\n")]  # fmt: skip
    tar = write_tar(tmp_path / "l.tar", members)
    assert [(r.id.split("#")[1], r.label) for r in _tok(image_size=16)(tar)] == [
        ("a", 12), ("b", 3), ("c", None), ("d", None)  # no cls, or a negative one: no label
    ]  # fmt: skip


def test_bad_samples_are_skipped_with_one_warning(tmp_path, caplog):
    good = _image_members(6)
    bad = [
        ("n01/b0.jpg", b"not a jpeg at all"),
        ("n01/b1.png", _encoded(_ramp(20, 20), "PNG")), ("n01/b1.cls", b"dog"),
        ("n01/b2.json", b"{}"), ("n01/b2.txt", b"a caption"),
        ("n01/b3.png", b"\x89PNG\r\n\x1a\n" + bytes(100)),
    ]  # fmt: skip
    members = good[:4] + bad[:3] + good[4:8] + bad[3:] + good[8:]
    tar = write_tar(tmp_path / "some-bad.tar", members)
    tok = _tok(image_size=32)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.image"):
        recs = tok(tar)
    assert [r.id.split("#")[1] for r in recs] == [f"n01/s{i}" for i in range(6)]
    assert [r.label for r in recs] == list(range(6))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{tar}: skipped 4 of 10 samples: "
        "n01/b0 (corrupt: not a decodable image (Pillow cannot identify it)); "
        "n01/b1 (invalid: cls member n01/b1.cls holds b'dog', not an integer class index); "
        "n01/b2 (unsupported: no image member (n01/b2.json, n01/b2.txt)); ... (1 more)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.image"):
        streamed = list(tok.iter_records(tar))
    assert all(map(_same_record, recs, streamed)) and len(streamed) == 6
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_mostly_bad_tar_is_the_error(tmp_path):
    members = _image_members(2) + [("x/b0.jpg", b"garbage"), ("x/b1.jpg", b"garbage")]
    tar = write_tar(tmp_path / "bad.tar", members)
    tok = _tok(image_size=32)
    for run in (tok, lambda p: list(tok.iter_records(p))):
        with pytest.raises(TokenizeError) as e:
            run(tar)
        assert (e.value.source, e.value.kind) == (tar, "corrupt")
        assert e.value.reason == (
            "sample x/b0: not a decodable image (Pillow cannot identify it) (2 of 4 samples are unusable)"
        )
    stream = tok.iter_records(tar)  # the records come first, the error at the end
    assert [r.id for r in itertools.islice(stream, 2)] == [f"{tar}#n01/s0", f"{tar}#n01/s1"]
    with pytest.raises(TokenizeError):
        next(stream)
    # no image member at all: an audio shard given to the image tokenizer
    audio = write_tar(tmp_path / "audio.tar", [("a.flac", b"fLaC"), ("a.json", b"{}"), ("b.flac", b"fLaC")])
    with pytest.raises(TokenizeError) as e:
        tok(audio)
    assert (e.value.kind, e.value.reason) == (
        "unsupported",
        "sample a: no image member (a.flac, a.json) (2 of 2 samples are unusable)",
    )


def test_empty_and_damaged_tars(tmp_path):
    tok = _tok(image_size=32)
    path = tmp_path / "junk.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(tarfile.TarInfo("folder/"))  # size 0, a regular file named like a folder: no name
        info = tarfile.TarInfo("folder")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        for name in (".DS_Store", "__MACOSX/._a.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    for run in (tok, lambda p: list(tok.iter_records(p))):
        with pytest.raises(TokenizeError) as e:
            run(str(path))
        assert (e.value.kind, e.value.reason) == ("empty", "the tar archive holds no samples")
    full = open(write_tar(tmp_path / "full.tar", _image_members(4)), "rb").read()
    (tmp_path / "cut.tar").write_bytes(full[: len(full) // 2])
    with pytest.raises(TokenizeError) as e:
        tok(str(tmp_path / "cut.tar"))
    assert e.value.kind == "corrupt" and e.value.reason.startswith("truncated or damaged tar archive: ")
    (tmp_path / "photo.tar").write_bytes(_encoded(_ramp(20, 20), "JPEG"))  # a JPEG named .tar
    with pytest.raises(TokenizeError) as e:
        tok(str(tmp_path / "photo.tar"))
    assert (e.value.kind, e.value.reason) == ("corrupt", "not a tar archive (bad checksum)")


def test_repeated_keys_and_members_too_large(tmp_path, monkeypatch):
    import maskloom.tokenizers.image as image_mod

    png = _encoded(_ramp(20, 20), "PNG")
    big = _encoded(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG")
    members = [("a.png", png), ("b.png", png), ("a.png", png), ("c.png", big), ("d.png", png), ("e.png", png)]
    tar = write_tar(tmp_path / "r.tar", members)
    monkeypatch.setattr(image_mod, "TAR_MEMBER_MAX_BYTES", 4096)
    tok = _tok(image_size=16)
    assert [r.id.split("#")[1] for r in tok(tar)] == ["a", "b", "d", "e"]
    with pytest.raises(TokenizeError) as e:
        tok(write_tar(tmp_path / "big.tar", members[3:4]))
    assert (e.value.kind, e.value.reason) == (
        "invalid",
        f"sample c: member c.png has {len(big):,} bytes, more than the 4,096 a tar member may have: not read "
        "(1 of 1 samples are unusable)",
    )
    with pytest.raises(TokenizeError) as e:
        tok(write_tar(tmp_path / "twice.tar", members[:1] * 2))
    assert e.value.reason == (
        "sample a: its key was seen before in the tar (a member name stored twice, or members of one "
        "sample not consecutive): ids must be unique (1 of 2 samples are unusable)"
    )


def test_heic_members_follow_the_pillow_heif_rule(tmp_path, monkeypatch):
    import maskloom.tokenizers.image as image_mod

    pytest.importorskip("pillow_heif")
    y, x = np.mgrid[0:40, 0:48]
    smooth = np.stack([y * 6, x * 5, (x + y) * 2], axis=2).astype(np.uint8)
    (tmp_path / "p.heic").write_bytes(_encoded(smooth, "HEIF", quality=95))
    tar = write_tar(tmp_path / "h.tar", [("p.heic", (tmp_path / "p.heic").read_bytes())])
    tok = _tok(image_size=32)
    (rec,), (want,) = tok(tar), tok(str(tmp_path / "p.heic"))
    np.testing.assert_array_equal(rec.tokens, want.tokens)
    monkeypatch.setattr(image_mod, "_heif_opener", lambda: False)
    with pytest.raises(TokenizeError) as e:
        tok(tar)
    assert (e.value.kind, e.value.reason) == (
        "unsupported",
        "sample p: HEIC/HEIF images need pillow-heif: pip install 'maskloom[heif]' (1 of 1 samples are unusable)",
    )


def test_render_of_a_tar_draws_its_first_image(tmp_path):
    tar = write_tar(
        tmp_path / "r.tar",
        [("a.png", _encoded(_ramp(20, 30), "PNG")), ("b.png", _encoded(_ramp(8, 8), "PNG"))],
    )
    tok = _tok()
    tok.render(tok.read(tar), str(tmp_path / "r.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r.png")), _ramp(20, 30))


def test_conformance_kit_with_a_tar(tmp_path):
    testing = pytest.importorskip("maskloom.testing")
    tar = write_tar(tmp_path / "shard.tar", _image_members(3) + _image_members(2, seed=1, folder="n02"))
    Image.fromarray(_ramp(40, 32)).save(tmp_path / "plain.png")
    tok = _tok(image_size=32)

    def compare(raw, out, rec):
        if isinstance(raw, TarImages):
            (raw,) = [s.image for s in raw if rec.id.endswith("#" + s.key)]
        np.testing.assert_array_equal(out, tok.preprocess(raw)[0])

    report = testing.check_tokenizer(tok, [tar, str(tmp_path / "plain.png")], compare=compare)
    assert report == {"sources": 2, "records": 6, "tokens": 24}


def test_preprocess_a_folder_of_tars_and_images(tmp_path):
    """End to end: a tar with one bad sample gives its good ones (with their ``cls`` labels), a
    truncated tar is one error row and none of its records, a plain JPEG beside them one record."""
    from maskloom.pipelines.preprocess import preprocess
    from maskloom.tables import TokenTable

    data = tmp_path / "data"
    data.mkdir()
    members = _image_members(4)
    good = write_tar(data / "good-000.tar", members[:4] + [("n01/bad.jpg", b"no jpeg")] + members[4:])
    full = open(write_tar(tmp_path / "full.tar", _image_members(4, seed=2, folder="n02")), "rb").read()
    (data / "cut-001.tar").write_bytes(full[: len(full) * 3 // 4])  # the first samples decode, then EOF
    cut = str(data / "cut-001.tar")
    other = str(data / "other.jpg")
    Image.fromarray(_photo(40, 60)).save(other, quality=90)
    out = str(tmp_path / "table")
    result = preprocess([good, cut, other], "image", None, out, num_workers=0, progress=False)
    assert (result.rows, result.errors, result.inputs) == (5, 1, 3)
    table = TokenTable(out)
    t = table.read(columns=["id", "source", "label"]).to_pylist()
    assert sorted((r["id"], r["label"]) for r in t) == [
        (f"{good}#n01/s0", 0), (f"{good}#n01/s1", 1), (f"{good}#n01/s2", 2), (f"{good}#n01/s3", 3),
        (f"{other}#0", None),
    ]  # fmt: skip
    assert not any(r["source"] == cut for r in t)
    assert table.label_names is None
    errors = table.errors().to_pylist()
    assert len(errors) == 1 and (errors[0]["source"], errors[0]["kind"]) == (cut, "corrupt")
    assert errors[0]["message"].startswith("truncated or damaged tar archive: ")
    (rec,) = [r for r in table.records() if r.id == f"{good}#n01/s2"]
    assert rec.meta["member"] == "n01/s2.png"
    np.testing.assert_array_equal(rec.tokens, _tok()(good)[2].tokens)
