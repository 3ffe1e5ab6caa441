"""The WebDataset-style tar reader of ``maskloom.tokenizers.base``: grouping by key, junk skipped,
gzip, truncated and damaged archives, members too large to read, a stream that cannot seek."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import threading
from typing import NamedTuple

import pytest

from maskloom.testing import write_tar
from maskloom.tokenizers.base import (
    TarItems,
    TarSample,
    TokenizeError,
    cls_label,
    is_tar_path,
    iter_tar_items,
    iter_tar_samples,
    tar_label,
    tar_member,
)


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere.jpg"
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _samples(path, **kw) -> list[tuple[str, dict[str, bytes], dict[str, str], dict[str, int]]]:
    return [tuple(s) for s in iter_tar_samples(str(path), **kw)]


class Items(TarItems):
    """A test tar's decoded samples (what a tokenizer's ``read`` returns for a tar)."""


class Item(NamedTuple):
    """One decoded sample of a test tar: its member's bytes."""

    key: str
    data: bytes
    label: int | None
    member: str


def _shard(n: int, size: int = 1000) -> list[tuple[str, bytes]]:
    """Samples s0..s{n-1}: a ``bin`` of ``size`` bytes and a ``cls`` each."""
    return [m for i in range(n) for m in ((f"s{i}.bin", bytes([i]) * size), (f"s{i}.cls", b"%d" % i))]


def test_members_are_grouped_by_key_with_directories_and_junk_is_skipped(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tf:
        _add(tf, "n01", kind=tarfile.DIRTYPE)
        _add(tf, "./n01/abc.JPEG", b"jpeg")  # a leading ./ is not part of the key
        _add(tf, "n01/abc.cls", b"3\n")
        _add(tf, "n01/._abc.JPEG", b"resource fork")  # macOS junk, hidden files, __MACOSX
        _add(tf, ".DS_Store", b"junk")
        _add(tf, "__MACOSX/n01/._abd.jpg", b"junk")
        _add(tf, "n01/.hidden/x.jpg", b"junk")
        _add(tf, "n01/abd.jpg", b"jpg")
        _add(tf, "n01/abd.seg.png", b"mask")  # extension: everything after the first dot
        _add(tf, "n01/link.jpg", kind=tarfile.SYMTYPE)  # not a regular file
        _add(tf, "n02/abc.jpg", b"other folder")  # same base name, other key
        _add(tf, "LICENSE", b"text")  # no dot: extension ""
        _add(tf, "n02/x.jpg", b"one")
        _add(tf, "n02/x.jpg", b"two")  # the same name again: a new sample with the same key
    assert _samples(path) == [
        ("n01/abc", {"jpeg": b"jpeg", "cls": b"3\n"}, {"jpeg": "./n01/abc.JPEG", "cls": "n01/abc.cls"}, {}),
        ("n01/abd", {"jpg": b"jpg", "seg.png": b"mask"}, {"jpg": "n01/abd.jpg", "seg.png": "n01/abd.seg.png"}, {}),
        ("n02/abc", {"jpg": b"other folder"}, {"jpg": "n02/abc.jpg"}, {}),
        ("LICENSE", {"": b"text"}, {"": "LICENSE"}, {}),
        ("n02/x", {"jpg": b"one"}, {"jpg": "n02/x.jpg"}, {}),
        ("n02/x", {"jpg": b"two"}, {"jpg": "n02/x.jpg"}, {}),
    ]  # fmt: skip
    assert all(isinstance(s, TarSample) for s in iter_tar_samples(str(path)))


def test_names_of_tar_shards():
    assert all(map(is_tar_path, ["a.tar", "B.TAR.GZ", "c.tgz", "d/imagenet-train-000123.tar"]))
    assert not any(map(is_tar_path, ["a.gz", "a.tar.bz2", "a.jpg", "tar"]))


def test_gzipped_tar_gives_the_same_samples(tmp_path):
    plain = write_tar(tmp_path / "a.tar", _shard(4))
    for name in ("a.tar.gz", "a.tgz"):
        (tmp_path / name).write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
        assert _samples(tmp_path / name) == _samples(plain)
    assert [s[0] for s in _samples(plain)] == ["s0", "s1", "s2", "s3"]
    assert _samples(plain)[2][1] == {"bin": b"\x02" * 1000, "cls": b"2"}


def _consume(path) -> tuple[list[str], TokenizeError]:
    keys = []
    with pytest.raises(TokenizeError) as info:
        for s in iter_tar_samples(str(path)):
            keys.append(s.key)
    return keys, info.value


def test_truncated_tar_is_corrupt_after_the_samples_before(tmp_path):
    data = open(write_tar(tmp_path / "full.tar", _shard(5)), "rb").read()
    # 512-byte headers, data padded to 512 bytes: sample i at 2560 i (s{i}.bin, then s{i}.cls at + 1536)
    (tmp_path / "cut.tar").write_bytes(data[: 3 * 2560 + 700])  # inside s3.bin's data
    keys, e = _consume(tmp_path / "cut.tar")
    assert keys == ["s0", "s1", "s2"]  # s2 ended where s3.bin's header began
    assert (e.source, e.kind) == (str(tmp_path / "cut.tar"), "corrupt")
    assert e.reason == "truncated or damaged tar archive: unexpected end of data (after 3 samples)"
    # cut where a header should be: tarfile alone would take that for the end of the archive
    (tmp_path / "cut.tar").write_bytes(data[: 2 * 2560])
    keys, e = _consume(tmp_path / "cut.tar")
    assert keys == ["s0"] and e.kind == "corrupt"
    assert e.reason == (
        "truncated or damaged tar archive: the archive ends at byte 5,120 without its end-of-archive "
        "marker (after 1 sample)"
    )
    (tmp_path / "cut.tar").write_bytes(data[: 2 * 2560 + 100])  # inside a header
    assert _consume(tmp_path / "cut.tar")[1].reason == (
        "truncated or damaged tar archive: the archive ends inside a header at byte 5,120 without its "
        "end-of-archive marker (after 1 sample)"
    )
    damaged = bytearray(data)
    damaged[2560 + 20] ^= 0xFF  # s1.bin's header: bad checksum
    (tmp_path / "bad.tar").write_bytes(bytes(damaged))
    keys, e = _consume(tmp_path / "bad.tar")
    assert keys == [] and e.kind == "corrupt"  # s0 was not yet known to be complete
    assert e.reason == (
        "truncated or damaged tar archive: invalid member header at byte 2,560 (bad checksum) (after 0 samples)"
    )
    # a gzipped tar cut short: the stream ends inside s3.bin
    gz = gzip.compress(data, mtime=0)
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(data[: 3 * 2560 + 700], mtime=0)[:-8])
    keys, e = _consume(tmp_path / "cut.tar.gz")
    assert keys == ["s0", "s1", "s2"] and e.kind == "corrupt"
    assert e.reason == "truncated or damaged tar archive: unexpected end of data (after 3 samples)"
    (tmp_path / "half.tar.gz").write_bytes(gz[: len(gz) // 2])
    assert _consume(tmp_path / "half.tar.gz")[1].kind == "corrupt"


def test_files_that_are_not_tar_archives(tmp_path):
    cases = {
        "text.tar": b"hello, this is not a tar archive\n" * 40,
        "short.tar": b"tiny",
        "json.tar.gz": gzip.compress(b'{"a": 1}\n' * 200),
        "garbled.tgz": b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        keys, e = _consume(tmp_path / name)
        assert keys == [] and (e.source, e.kind) == (str(tmp_path / name), "corrupt")
        assert e.reason.startswith("not a tar archive ("), e.reason
    assert _consume(tmp_path / "text.tar")[1].reason == "not a tar archive (invalid header)"
    assert _consume(tmp_path / "short.tar")[1].reason == "not a tar archive (truncated header)"
    (tmp_path / "zero.tar").write_bytes(b"")
    assert (_consume(tmp_path / "zero.tar")[1].kind, _consume(tmp_path / "missing.tar")[1].kind) == (
        "empty",
        "missing",
    )
    (tmp_path / "dir.tar").mkdir()
    assert _consume(tmp_path / "dir.tar")[1].kind == "unsupported"
    with tarfile.open(tmp_path / "none.tar", "w"):
        pass  # an archive with no member: no sample, no error (the consumer decides)
    assert _samples(tmp_path / "none.tar") == []


def test_members_over_the_bound_are_not_read(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("a.jpg", b"x" * 5000), ("a.cls", b"1"), ("b.jpg", b"y" * 100)])
    assert _samples(path, max_member_bytes=1000) == [
        ("a", {"cls": b"1"}, {"jpg": "a.jpg", "cls": "a.cls"}, {"jpg": 5000}),
        ("b", {"jpg": b"y" * 100}, {"jpg": "b.jpg"}, {}),
    ]


def test_the_archive_is_read_as_a_stream(tmp_path):
    """A named pipe cannot seek: the reader takes its samples as they come."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    write_tar(tmp_path / "a.tar", _shard(3, size=70_000))
    fifo = str(tmp_path / "pipe.tar")
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:
            f.write((tmp_path / "a.tar").read_bytes())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    got = _samples(fifo)
    writer.join(10)
    assert got == _samples(tmp_path / "a.tar") and len(got) == 3


def test_iter_tar_items_is_the_shared_policy(tmp_path, caplog):
    """``make``'s TokenizeErrors, repeated keys and members too large skip a sample; one warning on
    the logger given; a mostly unusable tar is the error, at its end."""
    import logging

    def make(sample: TarSample) -> tuple[str, int | None]:
        ext = tar_member(sample, ("bin", "dat"))
        if ext is None:
            raise TokenizeError("t", "unsupported", "no bin member")
        return sample.key, tar_label(sample)

    members = _shard(3, size=10) + [("x.txt", b"t"), ("s0.bin", b"again"), ("big.bin", bytes(50))]
    members += [("s9.seg.bin", b""), ("s5.dat", b"d"), ("s5.cls", b"-1")] + _shard(5, size=10)[6:]
    path = write_tar(tmp_path / "p.tar", members)
    logger = logging.getLogger("maskloom.test.tar")
    with caplog.at_level(logging.WARNING, logger="maskloom.test.tar"):
        items = list(iter_tar_items(path, make, max_member_bytes=40, logger=logger))
    assert items == [("s0", 0), ("s1", 1), ("s2", 2), ("s5", None), ("s3", 3), ("s4", 4)]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("maskloom.test.tar", f"{path}: skipped 4 of 10 samples: x (unsupported: no bin member); "
         "s0 (invalid: its key was seen before in the tar (a member name stored twice, or members of one "
         "sample not consecutive): ids must be unique); big (invalid: member big.bin has 50 bytes, more "
         "than the 40 a tar member may have: not read); ... (1 more)")
    ]  # fmt: skip
    with pytest.raises(TokenizeError) as e:
        list(iter_tar_items(write_tar(tmp_path / "q.tar", [("a.txt", b"")]), make))
    assert (e.value.kind, e.value.reason) == (
        "unsupported",
        "sample a: no bin member (1 of 1 samples are unusable)",
    )
    assert cls_label(b" 4\n", "a.cls") == 4 and cls_label(b"-3", "a.cls") is None


def test_a_tar_read_whole_skips_what_it_streams_with_one_warning(tmp_path, caplog):
    """Samples that do not decode and samples that decode but do not tokenize count together,
    whether the tar streams (iter_tar_records) or is read whole then tokenized (read_tar +
    tokenize_tar): the same records, one identical warning, the same error when most are bad."""
    import logging

    from maskloom.tokenizers.base import iter_tar_records, read_tar, tokenize_tar

    def decode(f, name: str, ext: str) -> bytes:
        data = f.read()
        if data.startswith(b"bad"):
            raise TokenizeError(name, "corrupt", "does not decode")
        return data

    def records(item: Item) -> list[str]:
        key, data = item.key, item.data
        if data.startswith(b"small"):
            raise TokenizeError("t", "too_small", "too few values")
        return [f"{key}:{data.decode()}"]

    def both(path):
        logger = logging.getLogger("maskloom.test.tar2")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="maskloom.test.tar2"):
            try:
                streamed = list(iter_tar_records(path, ("bin",), "x", decode, Item, records, logger=logger))
            except TokenizeError as e:
                streamed = (e.kind, e.reason)
            warned = [r.getMessage() for r in caplog.records]
            caplog.clear()
            try:
                whole = tokenize_tar(
                    path, read_tar(Items, path, ("bin",), "x", decode, Item), records, logger
                )
            except TokenizeError as e:
                whole = (e.kind, e.reason)
            assert [r.getMessage() for r in caplog.records] == warned
        assert whole == streamed
        return streamed, warned

    # s1 tokenizes badly, s3 decodes badly: 2 of 5 skipped, named in tar order
    path = write_tar(tmp_path / "a.tar", [("s0.bin", b"a"), ("s1.bin", b"small"), ("s2.bin", b"b"), ("s3.bin", b"bad"),
                                     ("s4.bin", b"c")])  # fmt: skip
    got, warned = both(path)
    assert got == ["s0:a", "s2:b", "s4:c"]
    assert warned == [
        f"{path}: skipped 2 of 5 samples: s1 (too_small: too few values); s3 (corrupt: does not decode)"
    ]
    # 2 decode, 1 tokenizes: neither stage alone is most of the 4, together they are
    path = write_tar(
        tmp_path / "b.tar", [("s0.bin", b"small"), ("s1.bin", b"a"), ("s2.bin", b"small"), ("s3.bin", b"bad")]
    )
    got, warned = both(path)
    assert got == ("too_small", "sample s0: too few values (3 of 4 samples are unusable)") and warned == []


def test_tar_readers_tell_the_sample_guard_where_they_are_and_skip_its_samples(tmp_path, caplog):
    """Inside ``guarded_samples`` both ways of reading a tar report each sample's index before it is
    decoded (and before it is tokenized when read whole), -1 at the end, and skip the guard's samples
    as ``crashed`` under the tar's policy: the same records and warning either way."""
    import logging

    from maskloom.tokenizers.base import guarded_samples, iter_tar_records, read_tar, tokenize_tar

    class Guard:
        def __init__(self, skip: dict[int, tuple[str, str]]) -> None:
            self.skip, self.seen = skip, []

        def at(self, sample: int) -> None:
            self.seen.append(sample)

    def decode(f, name: str, ext: str) -> bytes:
        return f.read()

    def records(item: Item) -> list[str]:
        return [f"{item.key}:{item.data.decode()}"]

    path = write_tar(tmp_path / "a.tar", [(f"s{i}.bin", b"%d" % i) for i in range(5)])
    logger = logging.getLogger("maskloom.test.tar3")
    died = ("crashed", "the process decoding it died 2 times")
    warning = f"{path}: skipped 1 of 5 samples: s2 (crashed: the process decoding it died 2 times)"
    with caplog.at_level(logging.WARNING, logger="maskloom.test.tar3"):
        streamed = Guard({2: died})
        with guarded_samples(streamed):
            got = list(iter_tar_records(path, ("bin",), "x", decode, Item, records, logger=logger))
        assert got == ["s0:0", "s1:1", "s3:3", "s4:4"]
        assert streamed.seen == [0, 1, 3, 4, -1]
        assert [r.getMessage() for r in caplog.records] == [warning]
        caplog.clear()
        whole = Guard({2: died})
        with guarded_samples(whole):
            got = tokenize_tar(path, read_tar(Items, path, ("bin",), "x", decode, Item), records, logger)
        assert got == ["s0:0", "s1:1", "s3:3", "s4:4"]
        assert whole.seen == [0, 1, 3, 4, -1, 0, 1, 3, 4, -1]  # decoding, then tokenizing
        assert [r.getMessage() for r in caplog.records] == [warning]
    unguarded = Guard({0: died})
    with guarded_samples(unguarded), guarded_samples(None):  # an inner block without a guard: none
        assert len(list(iter_tar_records(path, ("bin",), "x", decode, Item, records))) == 5
    assert unguarded.seen == []


def _members(modality: str, n: int) -> list[tuple[str, bytes]]:
    """n samples s0..s{n-1} of ``modality`` (a member its tokenizer decodes, and a ``cls``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        if modality == "image":
            from PIL import Image

            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            name = f"s{i}.png"
        elif modality == "audio":
            import soundfile as sf

            sf.write(buf, rng.standard_normal(3200).astype(np.float32) * 0.1, 16000, format="WAV")
            name = f"s{i}.wav"
        else:
            np.save(buf, rng.standard_normal((256, 3)).astype(np.float32))
            name = f"s{i}.npy"
        out += [(name, buf.getvalue()), (f"s{i}.cls", b"%d" % i)]
    return out


@pytest.mark.parametrize("modality", ["image", "audio", "point_cloud"])
def test_built_in_tar_readers_skip_the_guards_samples(tmp_path, modality):
    """The image, audio and point-cloud tokenizers read tars through the shared readers: inside
    ``guarded_samples`` their streamed and whole-tar records both skip the guard's samples."""
    from maskloom.tokenizers.base import get_tokenizer, guarded_samples

    class Guard:
        skip = {1: ("crashed", "the process decoding it died 2 times")}

        def at(self, sample: int) -> None:
            pass

    config = {"num_groups": 8, "group_size": 16} if modality == "point_cloud" else {}
    tok = get_tokenizer(modality, config)
    tar = write_tar(tmp_path / "s.tar", _members(modality, 3))
    every = tok(tar)
    assert [r.id for r in every] == [f"{tar}#s{i}" for i in range(3)]
    with guarded_samples(Guard()):
        streamed = list(tok.iter_records(tar))
        whole = tok(tar)
    assert [r.id for r in streamed] == [r.id for r in whole] == [f"{tar}#s0", f"{tar}#s2"]
    assert [r.label for r in whole] == [0, 2]


def test_tar_readers_report_the_skipped_samples_once(tmp_path):
    """Streamed or read whole, a tar whose samples were partly skipped hands one SkipReport to
    ``reporting_skips`` (the pipeline's count); a tar that is the error reports nothing."""
    from maskloom.tokenizers.base import SkipReport, iter_tar_records, read_tar, reporting_skips, tokenize_tar

    def decode(f, name: str, ext: str) -> bytes:
        data = f.read()
        if data == b"bad":
            raise TokenizeError(name, "corrupt", "does not decode")
        return data

    def records(item: Item) -> list[str]:
        if item.data == b"small":
            raise TokenizeError("t", "too_small", "too few values")
        return [item.key]

    def streamed(path):
        return list(iter_tar_records(path, ("bin",), "x", decode, Item, records))

    def whole(path):
        return tokenize_tar(path, read_tar(Items, path, ("bin",), "x", decode, Item), records)

    parts = [b"a", b"small", b"bad", b"b", b"c"]
    path = write_tar(tmp_path / "a.tar", [(f"s{i}.bin", d) for i, d in enumerate(parts)])
    bad = write_tar(tmp_path / "b.tar", [("s0.bin", b"bad"), ("s1.bin", b"a")])
    for read in (streamed, whole):
        reports = []
        with reporting_skips(reports.append):
            assert read(path) == ["s0", "s3", "s4"]
            with pytest.raises(TokenizeError):
                read(bad)
        assert reports == [SkipReport(path, "samples", 2, 5, "s1 (too_small: too few values)")]
    assert streamed(path) == ["s0", "s3", "s4"]  # nobody listening: nothing to hand over
