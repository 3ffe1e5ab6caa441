"""A small labelled demo dataset for all seven modalities, in real file formats.

``write_demo_data(out_dir)`` writes synthetic samples whose class is visible in their structure
(a shape, a moving object, a pitch contour, a solid, a graph family, a waveform, a topic), so that a
masked model pretrained on them gives features a linear probe can separate. Labels come from
folder names (the ImageFolder convention, ``maskloom.pipelines.sources`` with ``labels="folder"``),
except for graphs (TU format: ``DEMO_graph_labels.txt``) and text (a ``label`` field per line):

    out/image/<class>/<class>_0000.png         64x64 RGB: circle, square, triangle, stripes
    out/video/<class>/<class>_0000.mp4         64x64, 16 frames, H.264 (PyAV): a circle, square or
                                               triangle gliding in a random direction, or drifting stripes
    out/audio/<class>/<class>_0000.wav         16 kHz mono 1 s PCM-16: chirp_up, chirp_down, steady, pulses
    out/point_cloud/<class>/<class>_0000.ply   1024 surface points (binary PLY): sphere, cube, cylinder,
                                               cone, randomly rotated and scaled
    out/graph/DEMO/raw/DEMO_*.txt              TU format (Morris et al., 2020, "TUDataset"): cycle, tree,
                                               grid, dense graphs; node attributes = one-hot degree
    out/time_series/<class>/<class>_0000.csv   3 channels x 512 steps: sine, square, sawtooth, ar_noise
    out/time_series_long/series.csv            one 4-channel series (date + 3 + OT), 4096 hourly steps,
                                               laid out like ETTh1, for forecasting
    out/text/docs.jsonl                        {"text", "label"} documents on sports, cooking, space, music
    out/demo_data.json                         the summary, seed and size (marks the folder as ours)

Every file is made from its own random generator seeded by ``(seed, modality, class, index)``,
so the same seed gives the same bytes (H.264: see ``X264_OPTIONS``), a larger
``per_class`` only adds files, and writing a subset of modalities gives the same files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from maskloom._paths import make_out_dir

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("image", "video", "audio", "point_cloud", "graph", "time_series", "text")
CLASSES: dict[str, tuple[str, ...]] = {
    "image": ("circle", "square", "triangle", "stripes"),
    "video": ("circle", "square", "triangle", "stripes"),
    "audio": ("chirp_up", "chirp_down", "steady", "pulses"),
    "point_cloud": ("sphere", "cube", "cylinder", "cone"),
    "graph": ("cycle", "tree", "grid", "dense"),
    "time_series": ("sine", "square", "sawtooth", "ar_noise"),
    "text": ("sports", "cooking", "space", "music"),
}
MARKER = "demo_data.json"

IMAGE_SIZE = 64
VIDEO_SIZE, VIDEO_FRAMES, VIDEO_FPS = 64, 16, 8
SAMPLE_RATE, AUDIO_SECONDS = 16000, 1.0
NUM_POINTS = 1024
SERIES_STEPS, SERIES_CHANNELS = 512, 3  # 512 = the time-series tokenizer's default window
LONG_STEPS = 4096
DEGREE_BINS = 8
X264_OPTIONS = {"qp": "18", "preset": "veryfast", "threads": "1", "x264-params": "asm=0"}
"""libx264 settings chosen so the same seed gives the same bytes: one thread, a constant quantiser
(CRF rate control was seen to vary from run to run) and no SIMD assembly (as cheap at 64x64)."""  # graph node attribute: one-hot of min(degree, 7)


def _rng(seed: int, modality: str, cls: int, index: int) -> np.random.Generator:
    """The generator of one file: independent of which other files or modalities are written."""
    return np.random.default_rng([seed, MODALITIES.index(modality), cls, index])


# ---------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------
def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random background colour and a foreground colour at least 88 levels away on every channel."""
    bg = rng.integers(0, 256, 3)
    fg = (bg + 128 + rng.integers(-40, 41, 3)) % 256
    return bg.astype(np.float32), fg.astype(np.float32)


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool mask of a randomly placed, sized and rotated shape (or a stripe texture)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    theta = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        period = rng.uniform(6, 14)
        return ((x * np.cos(theta) + y * np.sin(theta)) / period + rng.uniform()) % 1.0 < 0.5
    r = rng.uniform(0.14, 0.26) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    return _inside(kind, x - cx, y - cy, theta, r)


def _inside(kind: str, dx: np.ndarray, dy: np.ndarray, theta: float, r: float) -> np.ndarray:
    """Bool mask of a circle, square or triangle of size ``r`` rotated by ``theta``, at offsets
    (``dx``, ``dy``) from its centre (any broadcastable shapes)."""
    u = dx * np.cos(theta) + dy * np.sin(theta)  # coordinates in the shape's frame
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if kind == "circle":
        return u**2 + v**2 <= r**2
    if kind == "square":
        half = r * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # triangle: inside three half-planes whose normals are 120 degrees apart
    inside = np.ones_like(u, dtype=bool)
    for a in np.deg2rad([90.0, 210.0, 330.0]):
        inside &= u * np.cos(a) + v * np.sin(a) <= r * 0.55
    return inside


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 image of one shape class."""
    bg, fg = _colours(rng)
    mask = _shape_mask(kind, rng, IMAGE_SIZE)[..., None]
    img = np.where(mask, fg, bg) + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_image(path: str, kind: str, rng: np.random.Generator) -> None:
    from PIL import Image

    Image.fromarray(_image(kind, rng)).save(path, format="PNG", optimize=False)


# ---------------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------------
def _video(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(T, H, W, 3) uint8 clip: a shape of the class (as the images draw it) gliding across the frame
    in a random direction and bouncing off the borders; the stripes drift along a random direction."""
    bg, fg = _colours(rng)
    T, S = VIDEO_FRAMES, VIDEO_SIZE
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    theta = rng.uniform(0, 2 * np.pi)
    t = np.arange(T, dtype=np.float32)[:, None, None]
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(1.5, 3.0)  # pixels per frame
    if kind == "stripes":
        period = rng.uniform(8, 16)
        u = x * np.cos(theta) + y * np.sin(theta)  # across the stripes
        inside = ((u[None] - speed * t) / period + rng.uniform()) % 1.0 < 0.5  # (T, H, W)
    else:
        r = rng.uniform(0.16, 0.26) * S
        lo, hi = r + 1, S - r - 1

        def bounce(start: float, v: float) -> np.ndarray:  # a triangle wave between lo and hi
            span = hi - lo
            z = (start - lo + v * t[:, 0, 0]) % (2 * span)
            return lo + np.where(z <= span, z, 2 * span - z)

        cx = bounce(rng.uniform(lo, hi), speed * np.cos(angle))[:, None, None]
        cy = bounce(rng.uniform(lo, hi), speed * np.sin(angle))[:, None, None]
        inside = _inside(kind, x - cx, y - cy, theta, r)  # (T, H, W)
    clip = np.where(inside[..., None], fg, bg)
    return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def _rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H * 3 // 2, W) uint8 planar YUV 4:2:0 (BT.601, limited range).

    Integer arithmetic (the usual 8-bit fixed-point BT.601 coefficients), so the encoder input,
    and with it the file, is identical for a seed: float conversions (ours or FFmpeg's swscale)
    were seen to round differently from call to call (SIMD paths depend on memory alignment).
    """
    h, w, _ = frame.shape
    r, g, b = (frame[..., k].astype(np.int32) for k in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    cb = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128
    cr = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128

    def down(c: np.ndarray) -> np.ndarray:  # 2x2 mean: (H, W) -> (H/2, W/2), packed as (H/4, W) rows
        return ((c.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3)) + 2) // 4).reshape(h // 4, w)

    return np.clip(np.concatenate([y, down(cb), down(cr)]), 0, 255).astype(np.uint8)


def _write_video(path: str, kind: str, rng: np.random.Generator) -> None:
    import av

    frames = _video(kind, rng)
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = VIDEO_SIZE, VIDEO_SIZE, "yuv420p"
        stream.options = dict(X264_OPTIONS)
        for i, frame in enumerate(frames):
            yuv = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(frame), format="yuv420p")
            yuv.pts, yuv.time_base = i, Fraction(1, VIDEO_FPS)  # explicit timestamps for the rate control
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------
def _audio(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(N,) float32 waveform in [-1, 1] at SAMPLE_RATE: a tone pattern of one class."""
    n = int(SAMPLE_RATE * AUDIO_SECONDS)
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(250, 700)
    if kind == "chirp_up":
        freq = f0 * np.exp(np.log(rng.uniform(3, 5)) * t / AUDIO_SECONDS)
    elif kind == "chirp_down":
        freq = f0 * rng.uniform(3, 5) * np.exp(-np.log(rng.uniform(3, 5)) * t / AUDIO_SECONDS)
    else:
        freq = np.full(n, rng.uniform(250, 2000))
    wave = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi))
    if kind == "pulses":
        rate, duty = rng.uniform(4, 8), rng.uniform(0.3, 0.5)
        wave *= ((t * rate + rng.uniform()) % 1.0) < duty
    fade = np.minimum(1.0, np.minimum(t, AUDIO_SECONDS - t) / 0.01)  # 10 ms fades: no clicks at the ends
    wave = rng.uniform(0.3, 0.7) * wave * fade + rng.normal(0, 0.01, n)
    return np.clip(wave, -1, 1).astype(np.float32)


def _write_audio(path: str, kind: str, rng: np.random.Generator) -> None:
    import soundfile as sf

    sf.write(path, _audio(kind, rng), SAMPLE_RATE, subtype="PCM_16", format="WAV")


# ---------------------------------------------------------------------------------------------
# point cloud
# ---------------------------------------------------------------------------------------------
def _solid_surface(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) points uniformly on the surface of a unit solid centred at the origin."""
    if kind == "sphere":
        p = rng.normal(size=(n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if kind == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)  # push one coordinate onto a face
        return p
    u, a = rng.uniform(size=n), rng.uniform(0, 2 * np.pi, n)
    if kind == "cylinder":  # radius 1, height 2: side area 4 pi, caps 2 pi
        side = rng.uniform(size=n) < 4 / 6
        r = np.where(side, 1.0, np.sqrt(u))
        z = np.where(side, rng.uniform(-1, 1, n), rng.choice([-1.0, 1.0], n))
    else:  # cone, radius 1, height 2, apex up: side area pi*sqrt(5), base pi
        side = rng.uniform(size=n) < np.sqrt(5) / (np.sqrt(5) + 1)
        frac = np.sqrt(u)  # distance from the apex, area-uniform on the side
        r = np.where(side, frac, np.sqrt(u))
        z = np.where(side, 1 - 2 * frac, -1.0)
    return np.stack([r * np.cos(a), r * np.sin(a), z], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """(3, 3) uniformly random rotation (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _point_cloud(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(NUM_POINTS, 3) float32: a randomly rotated, scaled and shifted solid's surface with jitter."""
    p = _solid_surface(kind, rng, NUM_POINTS)
    p = p * rng.uniform(0.85, 1.15, 3)  # mild anisotropy
    p = p @ _random_rotation(rng).T * rng.uniform(0.5, 1.5) + rng.normal(0, 0.2, 3)
    return (p + rng.normal(0, 0.01, p.shape)).astype(np.float32)


def _write_point_cloud(path: str, kind: str, rng: np.random.Generator) -> None:
    points = _point_cloud(kind, rng)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment maskloom demo data\n"
        f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(points.astype("<f4").tobytes())


# ---------------------------------------------------------------------------------------------
# graph (TU format)
# ---------------------------------------------------------------------------------------------
def _graph(kind: str, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A graph of one family: (number of nodes, (E, 2) undirected edges with i < j)."""
    if kind == "cycle":
        n = int(rng.integers(8, 21))
        e = np.stack([np.arange(n), (np.arange(n) + 1) % n], axis=1)
    elif kind == "tree":
        n = int(rng.integers(8, 21))
        child = np.arange(1, n)
        e = np.stack([(rng.uniform(size=n - 1) * child).astype(np.int64), child], axis=1)  # parent < child
    elif kind == "grid":
        rows, cols = int(rng.integers(2, 5)), int(rng.integers(3, 6))
        n = rows * cols
        idx = np.arange(n).reshape(rows, cols)
        e = np.concatenate(
            [
                np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
                np.stack([idx[:-1].ravel(), idx[1:].ravel()], 1),
            ]
        )
    else:  # dense: Erdos-Renyi with high edge probability
        n = int(rng.integers(6, 13))
        i, j = np.triu_indices(n, 1)
        keep = rng.uniform(size=i.size) < rng.uniform(0.5, 0.8)
        e = np.stack([i[keep], j[keep]], axis=1)
    e = np.sort(e, axis=1)
    # relabel nodes randomly so node order carries no class information
    perm = rng.permutation(n)
    return n, np.sort(perm[e], axis=1)


def _write_graphs(root: str, seed: int, per_class: int) -> int:
    """Write the TU files of ``per_class`` graphs per family (interleaved by class); return the graph count."""
    raw = os.path.join(root, "DEMO", "raw")
    os.makedirs(raw, exist_ok=True)
    edges, indicator, labels, attrs = [], [], [], []
    offset = 0
    for i in range(per_class):
        for c, kind in enumerate(CLASSES["graph"]):
            n, e = _graph(kind, _rng(seed, "graph", c, i))
            both = np.concatenate([e, e[:, ::-1]]) + offset  # TU lists each undirected edge both ways
            edges.append(both[np.lexsort((both[:, 1], both[:, 0]))])
            deg = np.bincount(e.ravel(), minlength=n)
            attrs.append(np.eye(DEGREE_BINS)[np.minimum(deg, DEGREE_BINS - 1)])
            indicator.append(np.full(n, len(labels) + 1))
            labels.append(c)
            offset += n
    a = np.concatenate(edges) + 1  # TU node ids are 1-based
    _write_lines(os.path.join(raw, "DEMO_A.txt"), (f"{s}, {t}" for s, t in a))
    _write_lines(os.path.join(raw, "DEMO_graph_indicator.txt"), map(str, np.concatenate(indicator)))
    _write_lines(os.path.join(raw, "DEMO_graph_labels.txt"), map(str, labels))
    _write_lines(
        os.path.join(raw, "DEMO_node_attributes.txt"),
        (", ".join(f"{v:.1f}" for v in row) for row in np.concatenate(attrs)),
    )
    _write_lines(
        os.path.join(root, "DEMO", "classes.txt"), (f"{c} {k}" for c, k in enumerate(CLASSES["graph"]))
    )
    return len(labels)


def _write_lines(path: str, lines) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# time series
# ---------------------------------------------------------------------------------------------
def _waveform(kind: str, rng: np.random.Generator, steps: int) -> np.ndarray:
    """(steps,) one channel of a waveform family, random frequency, phase, amplitude and offset."""
    t = np.arange(steps) / steps
    cycles, phase = rng.uniform(3, 12), rng.uniform()
    x = (t * cycles + phase) % 1.0
    if kind == "sine":
        y = np.sin(2 * np.pi * x)
    elif kind == "square":
        y = np.where(x < 0.5, 1.0, -1.0)
    elif kind == "sawtooth":
        y = 2 * x - 1
    else:  # AR(1) noise, scaled to unit variance
        from scipy.signal import lfilter

        phi = rng.uniform(0.8, 0.95)
        x = rng.normal(0, np.sqrt(1 - phi**2), steps)
        x[0] = rng.normal()  # stationary start
        y = lfilter([1.0], [1.0, -phi], x)  # y[k] = phi * y[k-1] + x[k]
    return rng.uniform(0.5, 2.0) * y + rng.uniform(-1, 1) + rng.normal(0, 0.05, steps)


def _write_series(path: str, kind: str, rng: np.random.Generator) -> None:
    x = np.stack([_waveform(kind, rng, SERIES_STEPS) for _ in range(SERIES_CHANNELS)], axis=1)  # (T, C)
    _write_lines(
        path,
        [",".join(f"ch{c}" for c in range(SERIES_CHANNELS))]
        + [",".join(f"{v:.5f}" for v in row) for row in x],
    )


def _write_long_series(path: str, seed: int) -> None:
    """ETTh1-like hourly series: date, three load channels with daily/weekly cycles, and OT driven by them."""
    rng = np.random.default_rng([seed, MODALITIES.index("time_series"), 99])
    h = np.arange(LONG_STEPS)
    daily, weekly = np.sin(2 * np.pi * h / 24), np.sin(2 * np.pi * h / (24 * 7))
    chans = []
    for _ in range(3):
        noise = rng.normal(0, 0.3, LONG_STEPS).cumsum() * 0.05
        chans.append(rng.uniform(1, 3) * daily + rng.uniform(0.5, 1.5) * weekly + noise + rng.uniform(-2, 2))
    lagged = np.roll(np.mean(chans, axis=0), 3)
    ot = 0.8 * lagged + 0.002 * h + rng.normal(0, 0.1, LONG_STEPS)
    start = np.datetime64("2020-01-01T00:00")
    dates = (start + h.astype("timedelta64[h]")).astype(str)
    rows = [
        f"{str(d).replace('T', ' ')}:00," + ",".join(f"{v:.4f}" for v in vals)
        for d, vals in zip(dates, np.stack([*chans, ot], axis=1))
    ]
    _write_lines(path, ["date,load_a,load_b,load_c,OT", *rows])


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
_TOPIC_WORDS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "noun": "team coach goal match striker referee stadium league season ball player keeper fans trophy".split(),
        "verb": "scored kicked defended won lost trained passed tackled celebrated blocked".split(),
        "adj": "fast tired brilliant young defensive winning rival local".split(),
    },
    "cooking": {
        "noun": "chef soup oven garlic onion recipe butter pan sauce flour kitchen pasta salt dough".split(),
        "verb": "chopped baked stirred roasted tasted seasoned boiled whisked served grilled".split(),
        "adj": "fresh spicy golden crispy sweet creamy hot savory".split(),
    },
    "space": {
        "noun": "rocket planet orbit astronaut telescope galaxy moon comet satellite star crater nebula probe mission".split(),
        "verb": "launched orbited observed landed explored detected measured docked drifted photographed".split(),
        "adj": "distant bright frozen massive lunar dark silent ancient".split(),
    },
    "music": {
        "noun": "band guitar drummer song melody chorus album concert piano singer rhythm violin stage lyrics".split(),
        "verb": "played sang recorded tuned composed performed strummed rehearsed mixed hummed".split(),
        "adj": "loud gentle catchy acoustic slow live soulful electric".split(),
    },
}
_COMMON = {
    "noun": "day people city morning week friend story time".split(),
    "verb": "saw made found liked started".split(),
    "adj": "new good long small".split(),
}
_TEMPLATES = (
    "the {adj} {noun} {verb} the {noun}.",
    "a {noun} {verb} near the {adj} {noun}.",
    "yesterday the {noun} {verb} a {adj} {noun} again.",
    "everyone said the {noun} {verb} the {noun} with a {adj} {noun}.",
    "after the {noun}, the {adj} {noun} {verb} quickly.",
)


def _document(topic: str, rng: np.random.Generator) -> str:
    """A few sentences drawn mostly (85%) from the topic's words, the rest from common words."""
    words = _TOPIC_WORDS[topic]

    def pick(part: str) -> str:
        pool = words[part] if rng.uniform() < 0.85 else _COMMON[part]
        return str(pool[rng.integers(len(pool))])

    sentences = []
    for _ in range(int(rng.integers(3, 7))):
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        s = template
        for part in ("adj", "noun", "verb"):
            while "{" + part + "}" in s:
                s = s.replace("{" + part + "}", pick(part), 1)
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)


def _write_text(path: str, seed: int, per_class: int) -> None:
    lines = []
    for i in range(per_class):
        for c, topic in enumerate(CLASSES["text"]):
            doc = _document(topic, _rng(seed, "text", c, i))
            lines.append(json.dumps({"id": f"{topic}-{i:04d}", "text": doc, "label": topic}))
    _write_lines(path, lines)


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------
_FOLDER_WRITERS: dict[str, tuple[str, Callable[[str, str, np.random.Generator], None]]] = {
    "image": (".png", _write_image),
    "video": (".mp4", _write_video),
    "audio": (".wav", _write_audio),
    "point_cloud": (".ply", _write_point_cloud),
    "time_series": (".csv", _write_series),
}


def _prepare(out_dir: str, modalities: Sequence[str]) -> None:
    """Create ``out_dir``; clear the folders of ``modalities`` if an earlier demo-data run wrote them."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MARKER)):
        raise FileExistsError(
            f"{out_dir} is not empty and was not written by demo-data; choose a new or empty directory"
        )
    make_out_dir(out_dir, "demo data directory")  # OutDirError (a ValueError) for a file of that name
    for m in modalities:
        for folder in (m, "time_series_long") if m == "time_series" else (m,):
            path = os.path.join(out_dir, folder)
            if os.path.isdir(path):
                shutil.rmtree(path)


def write_demo_data(
    out_dir: str, *, seed: int = 0, per_class: int = 24, modalities: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Write the demo dataset under ``out_dir``; return ``{modality: {files, samples, classes, path}}``.

    out_dir:     a new, empty or earlier demo-data directory (other non-empty folders are refused).
    seed:        the same seed gives the same files.
    per_class:   samples per class (4 classes per modality).
    modalities:  a subset of MODALITIES (default: all seven).
    """
    mods = tuple(MODALITIES if modalities is None else modalities)
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {unknown}; choose from {', '.join(MODALITIES)}")
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    out_dir = os.path.abspath(out_dir)
    _prepare(out_dir, mods)
    summary: dict[str, dict[str, Any]] = {}
    for m in MODALITIES:
        if m not in mods:
            continue
        t0 = time.perf_counter()
        root = os.path.join(out_dir, m)
        classes = list(CLASSES[m])
        if m in _FOLDER_WRITERS:
            ext, write = _FOLDER_WRITERS[m]
            for c, kind in enumerate(classes):
                os.makedirs(os.path.join(root, kind), exist_ok=True)
                for i in range(per_class):
                    write(os.path.join(root, kind, f"{kind}_{i:04d}{ext}"), kind, _rng(seed, m, c, i))
            summary[m] = {
                "files": per_class * len(classes),
                "samples": per_class * len(classes),
                "classes": classes,
                "path": root,
            }
        elif m == "graph":
            n = _write_graphs(root, seed, per_class)
            summary[m] = {"files": 4, "samples": n, "classes": classes, "path": os.path.join(root, "DEMO")}
        else:  # text
            os.makedirs(root, exist_ok=True)
            _write_text(os.path.join(root, "docs.jsonl"), seed, per_class)
            summary[m] = {
                "files": 1,
                "samples": per_class * len(classes),
                "classes": classes,
                "path": os.path.join(root, "docs.jsonl"),
            }
        if m == "time_series":
            long_dir = os.path.join(out_dir, "time_series_long")
            os.makedirs(long_dir, exist_ok=True)
            _write_long_series(os.path.join(long_dir, "series.csv"), seed)
            summary["time_series_long"] = {
                "files": 1,
                "samples": 1,
                "classes": [],
                "path": os.path.join(long_dir, "series.csv"),
            }
        log.info("demo data: %s: %d samples in %.2f s", m, summary[m]["samples"], time.perf_counter() - t0)
    marker = os.path.join(out_dir, MARKER)
    previous: dict[str, Any] = {}
    if os.path.exists(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                previous = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is not valid JSON; rewriting it", marker)
    merged = {
        **previous.get("modalities", {}),
        **{m: {**v, "seed": seed, "per_class": per_class} for m, v in summary.items()},
    }
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"modalities": merged}, f, indent=1, sort_keys=True)
    return summary
