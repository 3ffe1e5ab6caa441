"""Image tokenizer: non-overlapping 16x16x3 pixel patches, as in ViT and MAE.

Patches follow Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words" (ViT); the masked
autoencoder recipe that consumes them is He et al., 2022, "Masked Autoencoders Are Scalable Vision
Learners" (MAE, ``models_mae.py``: 224x224 input, 16x16 patches, 196 tokens). Pixels are stored
as raw ``uint8``; normalisation (e.g. MAE's per-patch norm-pix target) belongs to the recipe.

Pipeline:

``read(path)``
    Decode JPEG / PNG / WebP / BMP / TIFF / GIF / AVIF / Netpbm (PBM, PGM, PPM) with Pillow into
    RGB ``uint8`` of shape (H, W, 3) (GIF, AVIF and Netpbm since 2026-12-04: a folder walk left
    them out before), and HEIC / HEIF (phone photos) with the optional ``pillow-heif``
    (``maskloom[heif]``; without it each such file is an ``unsupported`` error row saying so).
    EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo stands upright.
    A JPEG whose shorter side is at least 4 x ``image_size`` is decoded at a DCT scale that keeps
    it at least 2 x ``image_size`` (``ImageConfig.jpeg_draft``, on by default: a 12-megapixel photo
    tokenizes in 68 instead of 275 ms, its tokens within a few levels); the meta's
    ``original_size`` stays the file's, ``decoded_size`` says what was decoded.
    Only the first frame of an animated or multi-page file is used. Mode conversion:

    * ``RGB``: as is; ``L`` (grey) and ``1`` (bilevel): the grey value repeated in R, G and B;
    * ``RGBA``, ``LA``, ``PA`` and palette (``P``) images with transparency: **composited on a
      white background**, ``out = round((c * a + 255 * (255 - a)) / 255)`` per channel, so a
      fully transparent pixel is white and an opaque one keeps its colour (dropping the alpha
      channel would expose whatever colour the encoder left under transparent pixels, often black);
    * ``P`` without transparency: its palette colours;
    * 16-bit grey (``I;16`` variants, and ``I`` with values in [0, 65535]): **scaled**,
      ``round(v * 255 / 65535)`` — not clipped, which is what Pillow's own ``convert("RGB")`` does;
    * ``I`` outside [0, 65535] and ``F`` (float) outside [0, 1]: min-max stretched to [0, 255]
      (there is no fixed range to scale by); ``F`` inside [0, 1]: ``round(v * 255)``;
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion to RGB.

Tar shards (WebDataset layout: ImageNet-1k, CC3M, LAION ship ``imagenet-train-000123.tar``)
    A ``.tar``, ``.tar.gz`` or ``.tgz`` file is one input holding many samples (the rules below but
    for which member is the image are ``base.iter_tar_items``'s, which the audio tokenizer shares). A sample is the
    consecutive members sharing a key, the member path up to the first ``.`` of its base name, folder
    included (``n01440764/abc.jpg`` and ``n01440764/abc.cls`` are sample ``n01440764/abc``; the rest
    of the name, lower case, is the member's extension: ``jpg``, ``cls``, ``seg.png``). Directories,
    links, hidden files (``.DS_Store``, ``._abc.jpg``) and ``__MACOSX/`` are not members.
    Each sample with an image member gives one record, id ``<tar path>#<key>``, ``meta["member"]``
    the image member's name in the tar. The image member is the first of the extensions ``jpg``,
    ``jpeg``, ``jpe``, ``jfif``, ``png``, ``webp``, ``bmp``, ``tif``, ``tiff``, ``gif``, ``avif``,
    ``ppm``, ``pgm``, ``pbm``, ``pnm``, ``heic``, ``heif`` the sample has (a whole extension:
    ``seg.png`` is not one); it is decoded exactly as a file is (above: formats, modes, EXIF, JPEG
    draft, the pillow-heif rule), so its record equals that of the same image as a file but for
    ``id``, ``label`` and ``member``. Label: a ``cls`` member is WebDataset's class index, an integer
    in ASCII (``"207\n"``); it is the record's ``label`` (a negative one, which some unlabelled test
    shards write, is no label). The table's ``label_names`` stay None (the tar knows no class names);
    ``--labels folder`` replaces these labels by the folder's, as for files.
    A sample that is not usable is skipped: no image member (``unsupported``), an image that does not
    decode (its file's error kind), a ``cls`` that holds no integer (``invalid``), a member larger
    than ``TAR_MEMBER_MAX_BYTES`` (1 GiB: ``invalid``, not read into memory), a key seen before in the
    tar (``invalid``: ids must be unique). One warning per tar, at its end, counts them and names the
    first three ("shard.tar: skipped 2 of 1,000 samples: n01/x (corrupt: cannot decode image: ...);
    ..."). When they are at least as many as the usable samples the tar is the error: its error row
    has the first one's kind and reason, ending "(N of M samples are unusable)". A tar with no sample
    is ``empty``; a file that is not a tar ``corrupt`` ("not a tar archive (...)"); a truncated or
    damaged archive or compressed stream ``corrupt`` ("truncated or damaged tar archive: ... (after N
    samples)"), also when the archive just ends where the next header should be, without tar's
    end-of-archive marker. Those errors come at the end of the tar, after its first records: the
    pipeline then keeps none of them.
    The preprocessing pipeline streams a tar (``iter_records``): it is read in order, never seeked
    (gzip, also bzip2 and xz, detected from its bytes), one sample at a time, so memory does not grow
    with its size (but for the keys seen, checked for repeats: ~40 bytes a sample). 2,000 CIFAR-10
    JPEGs (32 x 32) in one tar stream at ~4,400 records/s at ``image_size=32`` (7,500 as separate
    files: tar's headers are parsed in Python, ~80 us a sample) and ~1,350 at 224 (1,500 as files).
    ``read(tar)`` instead decodes every usable sample into a :class:`TarImages` list of
    (key, image, label, member) (for tests and interactive use: it holds every image), which
    ``tokenize`` turns into the same records and ``render`` draws the first image of.

``tokenize(raw)``
    Resize so that the shorter side is ``image_size`` (aspect kept; no resize when it already
    is), centre-crop to ``image_size`` x ``image_size``, cut into patches with
    ``'(h p1) (w p2) c -> (h w) (p1 p2 c)'``: tokens (L, p*p*3) uint8 in row-major patch order,
    positions (L, 2) float32 ``(row, col)`` patch-grid indices. One record per image, id
    ``<source>#0``.

``detokenize(record)``
    Puts every patch back at its ``(row, col)`` position: the processed (resized + cropped) image
    (S, S, 3) uint8, exactly. A record holding a subset of the patches (e.g. only the visible ones)
    leaves the missing patches black.

Speed: ``tokenize`` patches with one numpy reshape/transpose copy (:func:`patchify`), takes the
centre crop as a view (no intermediate copy) and reuses the (row, col) lattice per grid size, so at
the data's native size (e.g. CIFAR-10 at ``image_size=32``) tokenizing costs a few microseconds,
far below JPEG decoding. Upscaling (e.g. 32 -> 224 bicubic) is Pillow's work and dominates when
asked for.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, ClassVar, NamedTuple

import numpy as np
from einops import rearrange

from maskloom.tokenizers.base import (
    TAR_EXTENSIONS,
    TAR_MEMBER_MAX_BYTES,
    Record,
    TableSpec,
    TarItems,
    TokenizeError,
    Tokenizer,
    is_tar_path,
    iter_tar_records,
    read_tar,
    register_tokenizer,
    tokenize_tar,
)

log = logging.getLogger(__name__)

INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
"""Names accepted for the resize filter (Pillow's ``Image.Resampling`` members, lower case)."""

PIL_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "AVIF", "PPM", "HEIF")
"""Pillow format names ``read`` accepts (MPO is the multi-picture JPEG many cameras write; Pillow's
``PPM`` is the Netpbm family: PBM, PGM, PPM)."""


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """Configuration of the image tokenizer."""

    image_size: int = 224
    """Side S of the square processed image: shorter side resized to S, then a centre S x S crop."""
    patch_size: int = 16
    """Side p of a square patch; S must be a multiple of p. One token holds p*p*3 uint8 values."""
    interpolation: str = "bicubic"
    """Resize filter: nearest, bilinear, bicubic (MAE's choice), lanczos, box or hamming."""
    jpeg_draft: bool = True
    """Decode a JPEG whose shorter side is at least 4 x ``image_size`` at a reduced scale (libjpeg's
    DCT scaling by 1/2, 1/4 or 1/8, Pillow's ``draft``), keeping its shorter side at least
    2 x ``image_size``, then resize as usual: a 12-megapixel phone photo tokenizes ~4x faster, its
    tokens within a few levels of the full decode's (mean 0.26, at most 3 on a noisy test photo).
    Smaller JPEGs (ImageNet's, COCO's) and other formats decode in full. False: always in full."""

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not isinstance(self.jpeg_draft, bool):
            raise ValueError(f"jpeg_draft must be true or false, got {self.jpeg_draft!r}")


class DecodedImage(np.ndarray):
    """The (H, W, 3) uint8 pixels :meth:`ImageTokenizer.read` decoded at a reduced scale
    (``jpeg_draft``), with the file's own (height, width), upright, in ``file_size``."""

    file_size: tuple[int, int] | None = None

    @classmethod
    def of(cls, pixels: np.ndarray, size_wh: tuple[int, int]) -> DecodedImage:
        out = pixels.view(cls)
        out.file_size = (int(size_wh[1]), int(size_wh[0]))
        return out


# ---------------------------------------------------------------------------------------------
# helpers shared with the video tokenizer
# ---------------------------------------------------------------------------------------------
def resample_filter(name: str):
    """Pillow resampling filter for an ``INTERPOLATIONS`` name."""
    from PIL import Image

    return getattr(Image.Resampling, name.upper())


_CROP_ONLY = ("bilinear", "hamming")
"""Filters for which :func:`resize_shorter_center_crop` resamples the crop's region only."""


def resize_shorter_center_crop(
    image: np.ndarray, size: int, interpolation: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Resize (H, W, 3) uint8 so its shorter side is ``size``, then centre-crop to (size, size, 3).

    The longer side becomes ``max(size, round(long * size / short))``. An image whose shorter side
    already equals ``size`` is only cropped (no resampling, so its pixels are kept exactly). The
    crop offset is ``(resized - size) // 2`` on each axis. Returns the crop (a new array) and
    ``{"resized_size": [H', W'], "crop_offset": [top, left]}``.

    With ``bilinear`` or ``hamming`` (filters without negative lobes) only the crop is resampled:
    Pillow resizes the region of the source that maps onto it (its ``box``), with the scale and
    filter positions of the whole resize, so the pixels outside the crop are never computed (a 256 x
    340 video frame to 224 x 224: 0.58 instead of 1.28 ms). The result equals resizing the whole
    image and cropping up to rounding (the coefficients follow the box's own float arithmetic, and
    Pillow rounds between its two passes): +-1 at most, in 0.6 % of the values of the video frames
    here (300 random shapes: 1.8 % on average, up to a quarter for small images). The other
    filters resize the whole image, then crop: ``nearest`` and ``box`` pick source pixels, which the
    box's arithmetic can move across a pixel edge, and ``bicubic`` and ``lanczos`` came out up to 23
    and 44 levels apart at some shapes.
    """
    view, facts = _resize_shorter_center_crop_view(image, size, interpolation)
    return view.copy(), facts  # C-contiguous, writable, never shares memory with ``image``


def _resize_shorter_center_crop_view(
    image: np.ndarray, size: int, interpolation: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`resize_shorter_center_crop` without the final copy: the crop may be a view of ``image``
    (callers must copy before handing it out; patchify copies anyway)."""
    h, w = int(image.shape[0]), int(image.shape[1])
    short = min(h, w)
    new_h = max(size, round(h * size / short))
    new_w = max(size, round(w * size / short))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    facts = {"resized_size": [new_h, new_w], "crop_offset": [top, left]}
    if (new_h, new_w) != (h, w):
        from PIL import Image

        im, resample = Image.fromarray(image), resample_filter(interpolation)
        if interpolation in _CROP_ONLY:
            sy, sx = h / new_h, w / new_w  # source pixels per resized pixel
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)  # the crop, in the source
            return np.asarray(im.resize((size, size), resample, box=box)), facts
        image = np.asarray(im.resize((new_w, new_h), resample))
    return image[top : top + size, left : left + size], facts


def grid_positions(*sizes: int) -> np.ndarray:
    """Row-major integer lattice of shape ``sizes`` as float32 coordinates: (prod(sizes), len(sizes)).

    Returns a new (writable) array each call; the lattice itself is computed once per ``sizes``."""
    return _grid_positions_cached(tuple(int(n) for n in sizes)).copy()


@functools.lru_cache(maxsize=64)
def _grid_positions_cached(sizes: tuple[int, ...]) -> np.ndarray:
    axes = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in sizes], indexing="ij")
    out = np.stack([a.reshape(-1) for a in axes], axis=-1)
    out.flags.writeable = False  # shared between calls: never handed out (grid_positions copies)
    return out


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(S_h, S_w, C) image -> (L, p*p*C) patches, ``'(h p1) (w p2) c -> (h w) (p1 p2 c)'``: a new
    C-contiguous array, row-major patch order. A plain numpy reshape/transpose (one copy), which is
    about twice as fast as ``einops.rearrange`` for the small images tokenized here."""
    p = patch_size
    sh, sw, c = image.shape
    h, w = sh // p, sw // p
    patches = image.reshape(h, p, w, p * c).transpose(0, 2, 1, 3)  # (h, w, p1, p2*c), a view
    return patches.copy().reshape(h * w, p * p * c)  # copy() is C-ordered and never a view of ``image``


def tokens_to_uint8(tokens: np.ndarray) -> np.ndarray:
    """uint8 tokens as they are; float tokens (e.g. a model's predictions) rounded and clipped to [0, 255]."""
    tokens = np.asarray(tokens)
    if tokens.dtype == np.uint8:
        return tokens
    return np.clip(np.rint(tokens.astype(np.float64)), 0, 255).astype(np.uint8)


def grid_size_of(record: Record, key: str, ndim: int) -> tuple[int, ...]:
    """Grid size from ``record.meta[key]``, else from the largest position per axis."""
    grid = record.meta.get(key)
    if grid is not None:
        return tuple(int(g) for g in grid)
    pos = np.asarray(record.positions)
    if pos.size == 0:
        raise ValueError(f"record {record.id!r}: no tokens and no {key!r} in meta; cannot detokenize")
    return tuple(int(m) + 1 for m in pos[:, :ndim].max(axis=0))


def scatter_patches(record: Record, grid: tuple[int, ...], token_shape: tuple[int, ...]) -> np.ndarray:
    """Place every token of ``record`` at its integer grid position.

    Returns an array of shape ``grid + token_shape`` (e.g. (h, w, p, p, 3)) of uint8; cells with no
    token are 0. Vectorised: one fancy-indexed assignment.
    """
    tokens = tokens_to_uint8(record.tokens)
    pos = np.rint(np.asarray(record.positions, dtype=np.float64)).astype(np.int64)  # (L, P)
    if tokens.ndim != 2 or tokens.shape[1] != int(np.prod(token_shape)):
        raise ValueError(
            f"record {record.id!r}: tokens of shape {tokens.shape} do not hold {token_shape} patches"
        )
    if pos.shape != (tokens.shape[0], len(grid)):
        raise ValueError(
            f"record {record.id!r}: positions of shape {pos.shape}, expected ({tokens.shape[0]}, {len(grid)})"
        )
    if pos.size and ((pos < 0).any() or (pos >= np.asarray(grid)).any()):
        raise ValueError(f"record {record.id!r}: positions outside the grid {grid}")
    canvas = np.zeros((*grid, *token_shape), dtype=np.uint8)
    canvas[tuple(pos.T)] = tokens.reshape(-1, *token_shape)
    return canvas


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8: ``round((c * a + 255 * (255 - a)) / 255)``, exact integers."""
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _scale_wide(values: np.ndarray, source: str, mode: str) -> np.ndarray:
    """Integer or float grey values of a wide mode (I;16, I, F) -> uint8 grey (see module docstring)."""
    v = values.astype(np.float64)
    if not np.isfinite(v).all():
        raise TokenizeError(source, "invalid", f"{mode} image has non-finite pixel values")
    if mode == "F":
        lo, hi, top = 0.0, 1.0, 1.0
    else:
        lo, hi, top = 0.0, 65535.0, 65535.0
    if v.size and lo <= v.min() and v.max() <= hi:
        if mode != "F":  # exact integer rounding: round(v * 255 / 65535)
            iv = values.astype(np.int64)
            return ((iv * 255 + 32767) // 65535).astype(np.uint8)
        return np.rint(v * (255.0 / top)).astype(np.uint8)
    vmin, vmax = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    log.info("%s: %s values span [%g, %g]; stretching to [0, 255]", source, mode, vmin, vmax)
    if vmax == vmin:
        return np.zeros(v.shape, np.uint8)
    return np.rint((v - vmin) * (255.0 / (vmax - vmin))).astype(np.uint8)


def pil_to_rgb(img, source: str = "") -> np.ndarray:
    """A loaded Pillow image of any common mode -> (H, W, 3) uint8 RGB (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode in ("L", "1"):
        return _grey_to_rgb(np.array(img.convert("L"), dtype=np.uint8))
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(np.array(img.convert("RGBA"), dtype=np.uint8))
        return np.array(img.convert("RGB"), dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(np.array(img.convert("RGBA"), dtype=np.uint8))
    if mode.startswith("I;16") or mode in ("I", "F"):
        key = "F" if mode == "F" else "I"
        return _grey_to_rgb(_scale_wide(np.asarray(img), source, key))
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise TokenizeError(
            source, "unsupported", f"cannot convert Pillow mode {mode!r} to RGB ({e})"
        ) from None


HEIF_EXTENSIONS: tuple[str, ...] = (".heic", ".heif")
"""What phones save photos as: read through the optional ``pillow-heif`` (``maskloom[heif]``)."""


@functools.cache
def _heif_opener() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow, once; False when it is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif",
    ".ppm", ".pgm", ".pbm", ".pnm", *HEIF_EXTENSIONS,
)  # fmt: skip
"""Extensions of image files; in a tar sample, the first of them present (in this order) is its image."""

_MEMBER_IMAGE_EXTENSIONS = tuple(e[1:] for e in IMAGE_EXTENSIONS)


class TarImage(NamedTuple):
    """One usable sample of a tar shard, decoded (an element of :class:`TarImages`)."""

    key: str
    """The sample's key: its members' path up to the first dot of the base name."""
    image: np.ndarray
    """(H, W, 3) uint8 RGB, as :meth:`ImageTokenizer.read` decodes an image file."""
    label: int | None
    """The class index in the sample's ``cls`` member, or None."""
    member: str
    """The image member's name in the tar."""


class TarImages(TarItems):
    """What :meth:`ImageTokenizer.read` returns for a tar shard: the :class:`TarImage` of each usable
    sample, in archive order (every image decoded and held: the pipeline streams instead)."""


@register_tokenizer("image")
class ImageTokenizer(Tokenizer):
    """Square image -> grid of p x p x 3 uint8 pixel patches with (row, col) positions (ViT / MAE).

    raw: (H, W, 3) uint8 RGB; for a tar shard, :class:`TarImages`. Record tokens (L, p*p*3) uint8
    with L = (S/p)^2, positions (L, 2) float32 (row, col). ``meta``: ``original_size`` [H, W],
    ``resized_size`` [H', W'], ``crop_offset`` [top, left], ``processed_size`` [S, S],
    ``patch_size`` p, ``grid`` [S/p, S/p]; ``member`` (the image's name in the tar) for a tar sample.
    """

    Config: ClassVar[type] = ImageConfig
    version: ClassVar[str] = "2"  # 2: only the crop is resampled (smoothing filters: values +-1)
    extensions: ClassVar[tuple[str, ...]] = (*IMAGE_EXTENSIONS, *TAR_EXTENSIONS)

    def spec(self) -> TableSpec:
        p = self.config.patch_size
        return TableSpec(
            modality=self.name,
            token_kind="continuous",
            token_dim=p * p * 3,
            token_dtype="uint8",
            position_axes=("row", "col"),
            position_kind="grid",
            token_shape=(p, p, 3),
        )

    # ---- read -----------------------------------------------------------------------------------
    def read(self, source: str) -> np.ndarray | TarImages:
        """Decode an image file to (H, W, 3) uint8 RGB, upright (EXIF) and converted as documented;
        a tar shard to the :class:`TarImages` of its usable samples."""
        source = os.fspath(source)
        if is_tar_path(source):
            return read_tar(TarImages, source, _MEMBER_IMAGE_EXTENSIONS, "image", self._decode, TarImage,
                            max_member_bytes=TAR_MEMBER_MAX_BYTES)  # fmt: skip
        self.check_file(source)
        if os.path.isdir(source):
            raise TokenizeError(source, "unsupported", "is a directory, not an image file")
        ext = os.path.splitext(source)[1].lower()
        if ext not in self.extensions:
            raise TokenizeError(
                source, "unsupported", f"extension {ext or '(none)'!r} is not one of {self.extensions}"
            )
        return self._decode(source, source, ext)

    def _decode(self, file: str | IO[bytes], name: str, ext: str) -> np.ndarray:
        """Decode the image in ``file`` (a path or a binary file object) as :meth:`read` documents;
        ``name`` is the source in errors and warnings, ``ext`` the lower-case extension (with its dot)
        the image was named with (HEIC/HEIF need pillow-heif)."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        if ext in HEIF_EXTENSIONS and not _heif_opener():
            raise TokenizeError(
                name, "unsupported", "HEIC/HEIF images need pillow-heif: pip install 'maskloom[heif]'"
            )
        try:
            with Image.open(file) as img:
                if img.format not in PIL_FORMATS:
                    raise TokenizeError(
                        name, "unsupported", f"{img.format} images are not read (only {PIL_FORMATS})"
                    )
                size = img.size  # (W, H) as stored, before any draft
                s2 = 2 * self.config.image_size
                if self.config.jpeg_draft and img.format == "JPEG" and min(size) >= 2 * s2:
                    img.draft(None, (s2, s2))  # the largest DCT scale keeping both sides >= 2 S
                img.load()  # decode now: a truncated file fails here, inside the try
                try:
                    upright = ImageOps.exif_transpose(img)
                except Exception as e:  # noqa: BLE001 - broken EXIF must not reject an image that decodes
                    log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
                    upright = img
                if upright.width == 0 or upright.height == 0:
                    raise TokenizeError(name, "empty", "image has zero width or height")
                rgb = pil_to_rgb(upright, name)
                if img.size != size:  # drafted: the file's own size (upright) for the record's meta
                    rgb = DecodedImage.of(rgb, size if upright.size == img.size else size[::-1])
                return rgb
        except TokenizeError:
            raise
        except Image.DecompressionBombError as e:
            raise TokenizeError(name, "invalid", f"image too large ({e})") from None
        except UnidentifiedImageError:
            raise TokenizeError(
                name, "corrupt", "not a decodable image (Pillow cannot identify it)"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / damaged data
            raise TokenizeError(name, "corrupt", f"cannot decode image: {e}") from None

    # ---- tokenize -------------------------------------------------------------------------------
    def _check_raw(self, raw: Any, source: str) -> np.ndarray:
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 3 or raw.shape[2] != 3:
            what = f"{type(raw).__name__} {getattr(raw, 'dtype', '')} {getattr(raw, 'shape', '')}".strip()
            raise TokenizeError(
                source or "<array>", "invalid", f"image raw must be a (H, W, 3) uint8 array, got {what}"
            )
        if raw.shape[0] == 0 or raw.shape[1] == 0:
            raise TokenizeError(source or "<array>", "empty", f"image has shape {raw.shape}")
        return raw

    def preprocess(self, raw: np.ndarray, *, source: str = "") -> tuple[np.ndarray, dict[str, Any]]:
        """(H, W, 3) uint8 -> the processed (S, S, 3) uint8 image and the resize/crop facts for meta."""
        raw = self._check_raw(raw, source)
        return resize_shorter_center_crop(raw, self.config.image_size, self.config.interpolation)

    def tokenize(self, raw: np.ndarray | TarImages, *, source: str = "") -> list[Record]:
        """(H, W, 3) uint8 -> one record: tokens (L, p*p*3) uint8, positions (L, 2) float32 (row, col).
        A tar shard's :class:`TarImages` -> one record per sample, id ``<source>#<key>``."""
        if isinstance(raw, TarImages):
            return tokenize_tar(source, raw, functools.partial(self._sample_records, source), logger=log)
        return [self._record(raw, source, f"{source}#0")]

    def iter_records(self, source: str) -> Iterator[Record]:
        """The records of :meth:`__call__`; a tar shard's one sample at a time, as it is read."""
        source = os.fspath(source)
        if is_tar_path(source):  # the shared tar policy (base.iter_tar_items): a bad sample is skipped
            return iter_tar_records(source, _MEMBER_IMAGE_EXTENSIONS, "image", self._decode, TarImage,
                                    functools.partial(self._sample_records, source),
                                    max_member_bytes=TAR_MEMBER_MAX_BYTES, logger=log)  # fmt: skip
        return iter(self(source))

    def _sample_records(self, source: str, s: TarImage) -> list[Record]:
        return [self._record(s.image, source, f"{source}#{s.key}", s.label, s.member)]

    def _record(
        self, raw: np.ndarray, source: str, rid: str, label: int | None = None, member: str | None = None
    ) -> Record:
        c = self.config
        p, s = c.patch_size, c.image_size
        raw = self._check_raw(raw, source)
        image, facts = _resize_shorter_center_crop_view(raw, s, c.interpolation)  # (S, S, 3), may be a view
        tokens = patchify(image, p)  # (L, p*p*3), '(h p1) (w p2) c -> (h w) (p1 p2 c)', a new array
        grid = [s // p, s // p]
        h, w = getattr(raw, "file_size", None) or raw.shape[:2]
        meta = {
            "original_size": [int(h), int(w)],
            **facts,
            "processed_size": [s, s],
            "patch_size": p,
            "grid": grid,
        }
        if h != raw.shape[0] or w != raw.shape[1]:
            meta["decoded_size"] = [int(raw.shape[0]), int(raw.shape[1])]  # a JPEG decoded at a DCT scale
        if member is not None:
            meta["member"] = member
        return Record(
            id=rid, source=source, tokens=tokens, positions=grid_positions(*grid), label=label, meta=meta
        )

    def detokenize(self, record: Record) -> np.ndarray:
        """Record -> processed image (S, S, 3) uint8; patches placed by their (row, col) positions."""
        p = int(record.meta.get("patch_size", self.config.patch_size))
        grid = grid_size_of(record, "grid", 2)
        canvas = scatter_patches(record, grid, (p, p, 3))  # (h, w, p, p, 3)
        return rearrange(canvas, "h w p1 p2 c -> (h p1) (w p2) c")

    def render(self, raw: np.ndarray | TarImages, path: str) -> None:
        """Save a (H, W, 3) uint8 image (raw or detokenized) as a PNG at ``path``; of a tar shard's
        :class:`TarImages`, its first image."""
        from PIL import Image

        if isinstance(raw, TarImages):
            if not raw:
                raise TokenizeError(str(path), "empty", "no samples to render")
            raw = raw[0].image
        Image.fromarray(self._check_raw(raw, str(path))).save(path, format="PNG")
