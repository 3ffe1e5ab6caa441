"""Audio tokenizer: exact token counts, positions and values (AudioMAE fbank), decoding, statistics, bad inputs."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from torchaudio.compliance import kaldi

from maskloom import _kernels, _mkl_fft
from maskloom.testing import check_tokenizer, write_tar
from maskloom.tokenizers import TOKENIZERS, TokenizeError, get_tokenizer
from maskloom.tokenizers.audio import Audio, AudioConfig, AudioTokenizer, KaldiFbank

MEAN, STD = -4.2677393, 4.5689974


def _tok(**kw) -> AudioTokenizer:
    return AudioTokenizer(AudioConfig(**{"target_frames": 128, **kw}))


def _sine(seconds: float, sr: int = 16000, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav(path, data: np.ndarray, sr: int = 16000, subtype: str = "FLOAT") -> str:
    sf.write(str(path), data, sr, subtype=subtype)
    return str(path)


def _reference_fbank(wav: np.ndarray, sr: int = 16000) -> np.ndarray:
    """AudioMAE's dataset.py, verbatim: waveform minus mean, Kaldi fbank."""
    w = torch.from_numpy(wav).unsqueeze(0)
    w = w - w.mean()
    return kaldi.fbank(
        w,
        htk_compat=True,
        sample_frequency=sr,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    ).numpy()


def test_registered_and_spec():
    assert TOKENIZERS.get("audio") is AudioTokenizer
    spec = get_tokenizer("audio").spec()
    assert (spec.modality, spec.token_kind, spec.token_dim, spec.token_dtype) == (
        "audio",
        "continuous",
        256,
        "float16",
    )
    assert (
        spec.position_axes == ("time", "freq")
        and spec.position_kind == "grid"
        and spec.token_shape == (16, 16)
    )
    assert get_tokenizer("audio").config.target_frames == 1024
    assert get_tokenizer("audio").needs_fit is False
    assert get_tokenizer("audio", {"normalize_with": "dataset"}).needs_fit is True


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        AudioConfig(target_frames=100)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        AudioConfig(num_mel_bins=120)
    with pytest.raises(ValueError, match="normalize_with"):
        AudioConfig(normalize_with="global")
    with pytest.raises(ValueError, match="norm_std"):
        AudioConfig(norm_std=0.0)
    with pytest.raises(ValueError, match="unknown key"):
        get_tokenizer("audio", {"frames": 128})
    with pytest.raises(dataclasses.FrozenInstanceError):
        AudioConfig().target_frames = 3  # type: ignore[misc]


def test_one_second_gives_8x8_tokens_with_exact_values(tmp_path):
    wav = _sine(1.0)
    tok = _tok()
    raw = tok.read(_wav(tmp_path / "a.wav", wav))
    assert raw.sample_rate == 16000 and raw.waveform.shape == (16000,) and raw.waveform.dtype == np.float32
    (rec,) = tok.tokenize(raw, source="a.wav")
    assert rec.id == "a.wav#0" and rec.source == "a.wav" and rec.label is None
    assert rec.tokens.shape == (64, 256) and rec.tokens.dtype == np.float16
    assert rec.positions.dtype == np.float32
    expected_pos = [[t, f] for t in range(8) for f in range(8)]  # time-major
    assert rec.positions.tolist() == expected_pos
    # (16000 - 400) // 160 + 1 = 98 real frames, padded to 128
    assert rec.meta["frames"] == 98 and rec.meta["total_frames"] == 98
    assert rec.meta["duration"] == 1.0 and rec.meta["sample_rate"] == 16000
    assert (rec.meta["norm_mean"], rec.meta["norm_std"]) == (MEAN, STD)
    fb = _reference_fbank(wav)
    assert fb.shape == (98, 128)
    full = np.concatenate([fb, np.zeros((30, 128), np.float32)])  # AudioMAE zero-pads the fbank
    z = ((full - MEAN) / (2 * STD)).astype(np.float16)

    # token t*8+f = patch (t, f): frames t*16..t*16+15, mel bins f*16..f*16+15, flattened time-major;
    # values equal up to float32 rounding of the fbank: at most one float16 step (2^-10), rarely
    for t, f in [(0, 0), (0, 7), (3, 5), (6, 2), (7, 7)]:
        np.testing.assert_allclose(
            rec.tokens[t * 8 + f].astype(np.float32),
            z[t * 16 : t * 16 + 16, f * 16 : f * 16 + 16].reshape(-1).astype(np.float32),
            rtol=2**-10,
            atol=1e-4,
        )
    want = z.reshape(8, 16, 8, 16).transpose(0, 2, 1, 3).reshape(64, 256)
    np.testing.assert_allclose(rec.tokens.astype(np.float32), want.astype(np.float32), rtol=2**-10, atol=1e-4)
    assert (rec.tokens == want).mean() > 0.99
    # the last time row of patches (frames 112..127) lies wholly in the padding: (0 - mean) / (2 std)
    assert np.all(rec.tokens[7 * 8 :] == np.float16(-MEAN / (2 * STD)))


def test_long_audio_is_cut_to_target_frames(tmp_path):
    tok = _tok()
    (rec,) = tok(_wav(tmp_path / "long.wav", _sine(2.0)))
    assert rec.tokens.shape == (64, 256)
    assert rec.meta["frames"] == 128 and rec.meta["total_frames"] == 198 and rec.meta["duration"] == 2.0
    np.testing.assert_allclose(tok.detokenize(rec), _reference_fbank(_sine(2.0))[:128], atol=0.02)


def _whole(tok: AudioTokenizer, path: str) -> Audio:
    """The recording decoded whole, as read() did before it learnt to stop at what the tokens need."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sr != tok.config.sample_rate:
        wav = tok._resampler(sr)(wav)
    return Audio(waveform=np.ascontiguousarray(wav), sample_rate=tok.config.sample_rate)


@pytest.mark.parametrize(
    "sr,channels,extra",  # extra: input samples beyond what the tokens need (negative: shorter)
    [(16000, 1, 1), (16000, 2, 7000), (8000, 1, 1), (44100, 2, 30000), (48000, 1, 2), (22050, 2, -1),
     (44101, 1, 5000), (11025, 1, 0)],
)  # fmt: skip
def test_long_recordings_are_decoded_only_as_far_as_the_tokens_need(tmp_path, sr, channels, extra, jit_path):
    """read() stops at the samples target_frames need (and the resampler's reach): the same tokens and
    meta as decoding the whole file, which for an hour of 44.1 kHz stereo took 8.7 s and 3.4 GB."""
    tok = _tok(target_frames=32)
    need = tok._input_samples(sr)
    n = need + extra
    data = np.random.default_rng(sr + channels).uniform(-0.5, 0.5, (n, channels)).astype(np.float32)
    path = _wav(tmp_path / "rec.wav", data, sr)
    raw = tok.read(path)
    assert raw.waveform.shape[0] == (
        -(-min(n, need) * 16000 // sr) if sr != 16000 else min(n, need)
    )  # only what is needed was read
    whole = _whole(tok, path)
    assert raw.total_samples == (whole.waveform.shape[0] if n > need else None)
    assert raw.duration == whole.duration
    (got,), (ref,) = tok.tokenize(raw, source="r"), tok.tokenize(whole, source="r")
    assert np.array_equal(got.tokens.view(np.uint16), ref.tokens.view(np.uint16))
    assert got.meta == ref.meta and ref.meta["frames"] == (32 if n >= need else ref.meta["frames"])


@pytest.mark.parametrize("max_windows", [0, 2, 5])
def test_long_recordings_cut_into_windows(tmp_path, max_windows, jit_path):
    """max_windows != 1: consecutive windows of target_frames frames, each tokenized exactly as that
    stretch of audio alone would be; the tail is kept when at least half a window is real."""
    tok = _tok(target_frames=32, max_windows=max_windows)  # a window: 32 frames = 5,120 samples at 16 kHz
    hop, need = 32 * 160, 31 * 160 + 400
    wav = (
        np.random.default_rng(1).uniform(-0.5, 0.5, 3 * hop + 20 * 160 + 400).astype(np.float32)
    )  # 3 windows + 21 frames
    path = _wav(tmp_path / "long.wav", wav)
    recs = tok(path)
    n = {0: 4, 2: 2, 5: 4}[max_windows]  # the tail (21 of 32 frames) is kept; 2 caps it
    assert [r.id for r in recs] == [f"{path}#{k}" for k in range(n)]
    assert [r.meta["window"] for r in recs] == list(range(n))
    assert [r.meta["offset"] for r in recs] == [k * hop / 16000 for k in range(n)]
    assert [r.meta["frames"] for r in recs] == [32, 32, 32, 21][:n]
    assert {r.meta["total_frames"] for r in recs} == {1 + (wav.shape[0] - 400) // 160}
    alone = _tok(target_frames=32)
    for k, r in enumerate(recs):
        (ref,) = alone.tokenize(
            Audio(waveform=wav[k * hop : k * hop + need].copy(), sample_rate=16000), source="x"
        )
        assert np.array_equal(r.tokens.view(np.uint16), ref.tokens.view(np.uint16)), k
    # a tail under half a window is dropped
    short = _wav(tmp_path / "short.wav", wav[: 3 * hop + 14 * 160 + 400])
    assert len(_tok(target_frames=32, max_windows=0)(short)) == 3
    with pytest.raises(ValueError, match="max_windows must be an integer >= 0"):
        _tok(max_windows=-1)


def test_audio_shorter_than_one_window_is_padded_to_one_frame(tmp_path):
    tok = _tok()
    wav = _sine(100 / 16000)  # 100 samples < 400-sample (25 ms) window
    (rec,) = tok(_wav(tmp_path / "short.wav", wav))
    assert rec.tokens.shape == (64, 256) and rec.meta["frames"] == 1
    padded = np.concatenate([wav - wav.mean(), np.zeros(300, np.float32)])
    expected = kaldi.fbank(
        torch.from_numpy(padded)[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    ).numpy()
    assert expected.shape == (1, 128)
    np.testing.assert_allclose(tok.detokenize(rec), expected, atol=2 * STD * 4 / 1024)


def test_round_trip_recovers_real_frames_within_float16(tmp_path):
    tok = _tok()
    wav = _sine(0.7, freq=1000.0) + _sine(0.7, freq=3000.0, amp=0.1)
    raw = tok.read(_wav(tmp_path / "b.wav", wav))
    (rec,) = tok.tokenize(raw, source="b")
    out = tok.detokenize(rec)
    fb = tok.fbank(raw.waveform).numpy()
    assert out.shape == fb.shape == (68, 128) and out.dtype == np.float32
    z = (fb - MEAN) / (2 * STD)
    # float16 keeps 11 significant bits: error <= |z| * 2**-11 in normalised units
    np.testing.assert_allclose(out, fb, rtol=0, atol=float(2 * STD * np.abs(z).max() * 2**-11) + 1e-5)
    # the same through the record's Arrow/table form: positions decide the placement
    perm = np.random.default_rng(0).permutation(64)
    shuffled = dataclasses.replace(rec, tokens=rec.tokens[perm], positions=rec.positions[perm])
    np.testing.assert_array_equal(tok.detokenize(shuffled), out)


def test_stereo_mix_down_is_exact_mean(tmp_path):
    left, right = _sine(0.5, freq=300.0), _sine(0.5, freq=700.0, amp=0.25)
    raw = _tok().read(_wav(tmp_path / "st.wav", np.stack([left, right], axis=1)))
    assert raw.waveform.shape == (8000,)
    np.testing.assert_array_equal(raw.waveform, ((left + right) / 2).astype(np.float32))


def test_resampling_8k_to_16k_doubles_length(tmp_path):
    raw = _tok().read(_wav(tmp_path / "lo.wav", _sine(1.0, sr=8000), sr=8000))
    assert raw.sample_rate == 16000 and raw.waveform.shape == (16000,) and raw.waveform.dtype == np.float32
    # a 440 Hz tone stays a 440 Hz tone: its spectrum peaks at bin 440 of a 1-s FFT
    spec = np.abs(np.fft.rfft(raw.waveform))
    assert int(spec.argmax()) == 440
    raw8 = _tok(sample_rate=8000).read(str(tmp_path / "lo.wav"))
    assert raw8.sample_rate == 8000 and raw8.waveform.shape == (8000,)


def test_flac_and_pcm16_read(tmp_path):
    wav = _sine(0.25)
    raw = _tok().read(_wav(tmp_path / "a.flac", wav, subtype="PCM_16"))
    np.testing.assert_allclose(raw.waveform, wav, atol=1 / 32768)


def _encode(path, codec: str, data: np.ndarray, sr: int, fmt: str | None = None) -> str:
    """``data`` (N,) or (N, C) float32 encoded with FFmpeg (PyAV) into the file at ``path``."""
    import av

    planar = np.ascontiguousarray(data.reshape(len(data), -1).T)  # (C, N)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sr)
        stream.layout = layout
        for i in range(0, planar.shape[1], 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, i : i + 4096]), "fltp", layout)
            frame.sample_rate, frame.pts = sr, i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return str(path)


def test_formats_libsndfile_lacks_are_decoded_with_ffmpeg(tmp_path):
    x = _sine(3.0, sr=44100, amp=0.3)
    stereo = np.stack([x, x], axis=1)
    # FLAC in Matroska is lossless: the same waveform as the FLAC file libsndfile reads
    mka = _encode(tmp_path / "a.mka", "flac", stereo, 44100)
    sf.write(str(tmp_path / "a.flac"), stereo, 44100, subtype="PCM_16")
    whole = _tok(max_windows=0)
    ref = whole.read(str(tmp_path / "a.flac"))
    got = whole.read(mka)
    assert got.total_samples is None and got.waveform.shape == ref.waveform.shape == (48000,)
    np.testing.assert_array_equal(got.waveform, ref.waveform)
    # only the beginning is decoded for the first window; the length is the container's
    first = _tok().read(mka)
    assert first.waveform.shape[0] < 48000 and first.total_samples == 48000
    (a,), (b,) = _tok().tokenize(first), _tok().tokenize(Audio(ref.waveform, 16000))
    np.testing.assert_array_equal(a.tokens, b.tokens)  # the same tokens as the whole waveform's
    # AAC (lossy) in MP4 (.m4a) and ADTS (.aac); mono at 22.05 kHz
    for name, fmt, data, sr in [("s.m4a", None, stereo, 44100), ("s.aac", "adts", x, 44100),
                                ("m.m4a", None, x[::2].copy(), 22050)]:  # fmt: skip
        raw = whole.read(_encode(tmp_path / name, "aac", data, sr, fmt))
        n = raw.waveform.shape[0]
        assert raw.sample_rate == 16000 and 48000 <= n <= 48000 + 2 * 2048 * 16000 // sr, (name, n)
        rms = float(np.sqrt(np.mean(raw.waveform[2000:46000] ** 2)))
        assert abs(rms - 0.3 / np.sqrt(2)) < 0.01, (name, rms)
        assert int(np.abs(np.fft.rfft(raw.waveform[:16000])).argmax()) in (439, 440, 441)  # still 440 Hz
        (rec,) = _tok().tokenize(_tok().read(str(tmp_path / name)), source=name)
        assert rec.tokens.shape == (64, 256) and np.isfinite(rec.tokens.astype(np.float32)).all()
    assert {".m4a", ".aac", ".wma", ".mka", ".opus"} <= set(AudioTokenizer.extensions)


def test_ffmpeg_formats_bad_inputs(tmp_path):
    import av

    tok = _tok()
    good = open(_encode(tmp_path / "s.m4a", "aac", _sine(1.0, sr=44100), 44100), "rb").read()
    (tmp_path / "half.m4a").write_bytes(good[: len(good) // 2])  # MP4's index (moov) is at the end
    (tmp_path / "junk.aac").write_bytes(bytes(range(256)) * 8)
    with av.open(str(tmp_path / "video.m4a"), "w", format="mp4") as out:  # video only
        s = out.add_stream("mpeg4", rate=10)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        out.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        out.mux(s.encode(None))
    for name, kind, text in [("half.m4a", "corrupt", "cannot decode audio (FFmpeg): Invalid data"),
                             ("junk.aac", "corrupt", "cannot decode audio (FFmpeg)"),
                             ("video.m4a", "empty", "no audio stream")]:  # fmt: skip
        with pytest.raises(TokenizeError) as e:
            tok.read(str(tmp_path / name))
        assert (e.value.kind, e.value.source) == (kind, str(tmp_path / name)) and text in str(e.value)
        assert str(tmp_path) not in e.value.reason  # FFmpeg's copy of the path is left out


@pytest.mark.skipif("OPUS" not in sf.available_subtypes("OGG"), reason="libsndfile without Opus")
def test_ogg_opus_read(tmp_path):
    sf.write(str(tmp_path / "a.opus"), _sine(1.0, sr=48000, amp=0.3), 48000, format="OGG", subtype="OPUS")
    raw = _tok(max_windows=0).read(str(tmp_path / "a.opus"))
    assert raw.waveform.shape == (16000,) and abs(float(np.sqrt(np.mean(raw.waveform**2))) - 0.212) < 0.01


def test_bad_inputs(tmp_path):
    tok = _tok()
    with pytest.raises(TokenizeError) as e:
        tok.read(str(tmp_path / "nope.wav"))
    assert e.value.kind == "missing"
    with pytest.raises(TokenizeError) as e:
        tok.read(_wav(tmp_path / "zero.wav", np.zeros(0, np.float32)))
    assert e.value.kind == "empty" and "zero.wav" in str(e.value)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4)
    with pytest.raises(TokenizeError) as e:
        tok.read(str(bad))
    assert e.value.kind == "corrupt" and "bad.wav" in str(e.value)
    odd = tmp_path / "notes.xyz"
    odd.write_bytes(b"hello world, not audio at all" * 10)
    with pytest.raises(TokenizeError) as e:
        tok.read(str(odd))
    assert e.value.kind == "unsupported"
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(Audio(waveform=np.zeros(0, np.float32), sample_rate=16000), source="mem")
    assert e.value.kind == "empty"
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(Audio(waveform=_sine(0.1, sr=8000), sample_rate=8000), source="mem")
    assert e.value.kind == "config"


def test_deterministic_and_does_not_mutate_input(tmp_path):
    tok = _tok()
    wav = _sine(0.4) + 0.3  # a DC offset: tokenize removes the mean from a copy
    raw = Audio(waveform=wav.copy(), sample_rate=16000)
    a = tok.tokenize(raw, source="x")[0]
    np.testing.assert_array_equal(raw.waveform, wav)
    b = pickle.loads(pickle.dumps(tok)).tokenize(raw, source="x")[0]
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.meta == b.meta


def test_fit_dataset_statistics_and_artifacts(tmp_path):
    paths = [_wav(tmp_path / f"{i}.wav", _sine(0.3 + 0.1 * i, freq=200.0 * (i + 1))) for i in range(3)]
    tok = _tok(normalize_with="dataset")
    with pytest.raises(RuntimeError, match="fit"):
        tok.tokenize(tok.read(paths[0]), source=paths[0])
    tok.fit(paths)
    fbs = np.concatenate(
        [_reference_fbank(_sine(0.3 + 0.1 * i, freq=200.0 * (i + 1))) for i in range(3)]
    ).astype(np.float64)
    assert tok.stats["files"] == 3 and tok.stats["frames"] == fbs.shape[0]
    # fbank equal to kaldi.fbank up to float32 rounding, whose last bits depend on the CPU the kernels
    # are compiled for (AVX-512 here: the mean was 1.03e-7 off, relative; rel=1e-7 failed there)
    assert tok.stats["mean"] == pytest.approx(fbs.mean(), rel=1e-6)
    assert tok.stats["std"] == pytest.approx(fbs.std(), rel=1e-6)
    (rec,) = tok(paths[1])
    assert rec.meta["norm_mean"] == tok.stats["mean"] and rec.meta["norm_std"] == tok.stats["std"]
    art = tmp_path / "art"
    assert tok.save_artifacts(str(art)) == ["audio_stats.json"]
    assert json.loads((art / "audio_stats.json").read_text())["mean"] == tok.stats["mean"]
    again = _tok(normalize_with="dataset")
    again.load_artifacts(str(art))
    np.testing.assert_array_equal(again(paths[1])[0].tokens, rec.tokens)
    with pytest.raises(FileNotFoundError, match="audio_stats.json"):
        _tok(normalize_with="dataset").load_artifacts(str(tmp_path / "empty"))
    # config normalisation needs no statistics and writes none
    assert _tok().save_artifacts(str(tmp_path / "none")) == []
    assert not os.path.exists(tmp_path / "none")


def test_fit_samples_a_bounded_number_of_files(tmp_path):
    paths = [_wav(tmp_path / f"{i}.wav", _sine(0.1)) for i in range(5)]
    tok = _tok(normalize_with="dataset", fit_max_files=2)
    tok.fit(paths)
    assert tok.stats["files"] == 2
    # evenly spaced over the sorted list: first and last; an unreadable pick is skipped
    tok.fit(paths + [str(tmp_path / "missing.wav")])
    assert tok.stats["files"] == 1
    with pytest.raises(ValueError, match="none of"):
        tok.fit([str(tmp_path / "missing.wav")])


def test_conformance_kit(tmp_path):
    paths = [_wav(tmp_path / f"{i}.wav", _sine(0.2 + 0.3 * i, freq=250.0 * (i + 1))) for i in range(3)]
    paths.append(
        _wav(
            tmp_path / "st.flac",
            np.stack([_sine(0.5), _sine(0.5, freq=90.0)], axis=1),
            sr=22050,
            subtype="PCM_24",
        )
    )

    def compare(raw, out, rec):
        fb = _tok().fbank(raw.waveform).numpy()[: rec.meta["frames"]]
        np.testing.assert_allclose(out, fb, atol=0.03)

    for tok in (_tok(), _tok(normalize_with="dataset")):
        report = check_tokenizer(tok, paths, compare=compare)
        assert report == {"sources": 4, "records": 4, "tokens": 4 * 64}


def test_render_writes_png(tmp_path):
    tok = _tok()
    raw = Audio(waveform=_sine(0.3), sample_rate=16000)
    tok.render(raw, str(tmp_path / "a.png"))
    tok.render(tok.detokenize(tok.tokenize(raw)[0]), str(tmp_path / "b.png"))
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the cached fbank and the padded-token shortcut: the same values as the plain formulation ------
def _kaldi_fbank(wav: torch.Tensor, sr: int, mel: int, shift: float) -> torch.Tensor:
    return kaldi.fbank(
        wav[None],
        htk_compat=True,
        sample_frequency=sr,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=mel,
        dither=0.0,
        frame_shift=shift,
    )


@pytest.mark.parametrize(("sr", "mel", "shift"), [(16000, 128, 10.0), (8000, 64, 10.0), (22050, 80, 12.5)])
def test_kaldi_fbank_equals_torchaudio(sr, mel, shift, jit_path):
    fb = KaldiFbank(sample_rate=sr, num_mel_bins=mel, frame_shift_ms=shift)
    assert (fb._mel_tables is not None) == (jit_path == "jit")  # every filter shape here compiles
    win = int(sr * 0.025)
    assert fb.window_size == win and fb.fft_size == 2 ** (win - 1).bit_length()
    rng = np.random.default_rng(sr + mel)
    for n in (win, win + 1, win + fb.window_shift - 1, win + fb.window_shift, 7612, 3 * sr // 2):
        t = np.arange(n) / sr
        for wav in (
            rng.standard_normal(n) * 0.3,  # noise
            0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.1 * np.sin(2 * np.pi * 3000.0 * t),  # tones
            np.where(t < t[-1] / 2, 0.0, 1e-4 * rng.standard_normal(n)),  # silence (epsilon floor), then hiss
        ):
            w = torch.from_numpy(wav.astype(np.float32))
            w = w - w.mean()
            out, ref = fb(w), _kaldi_fbank(w, sr, mel, shift)
            assert out.shape == ref.shape == (fb.num_frames(n), mel) and out.dtype == torch.float32
            # The CPU path regroups the arithmetic: float32 rounding of the mel energies, relative to
            # each frame's largest (measured <= 1e-6); in the log domain that is up to ~1e-3 in bins
            # 60 dB below the frame's peak, where kaldi.fbank in float32 is off by as much itself.
            power, ref_power = out.double().exp(), ref.double().exp()
            rel = (power - ref_power).abs() / ref_power.max(dim=1, keepdim=True).values
            assert rel.max() <= 1e-5, (n, float(rel.max()))
            loud = ref_power >= 1e-2 * ref_power.max(dim=1, keepdim=True).values  # within 20 dB of the peak
            assert ((out - ref).abs() <= 1e-5)[loud].all()
            # the torch path (other devices) keeps kaldi.fbank's order of operations
            torch_out = fb._torch(w)
            assert (torch_out - ref).abs().max() <= 1e-5, (n, float((torch_out - ref).abs().max()))
    with pytest.raises(ValueError, match="at least"):
        fb(torch.zeros(win - 1))
    assert fb.num_frames(win - 1) == 0


def _plain_tokens(tok: AudioTokenizer, wav: np.ndarray) -> np.ndarray:
    """The straightforward formulation: pad the whole filterbank, normalise it, then patch it."""
    c = tok.config
    fb = tok.fbank(wav)
    n = c.target_frames - fb.shape[0]
    fb = torch.nn.functional.pad(fb, (0, 0, 0, n), value=c.pad_value) if n > 0 else fb[: c.target_frames]
    x = ((fb - c.norm_mean) / (2.0 * c.norm_std)).to(torch.float16).numpy()
    p = c.patch_size
    return x.reshape(c.target_frames // p, p, c.num_mel_bins // p, p).transpose(0, 2, 1, 3).reshape(-1, p * p)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"pad_value": -3.0, "num_mel_bins": 64},
        {"target_frames": 32},
        {"num_mel_bins": 40, "patch_size": 8, "target_frames": 32},  # 40 filters: a padded group of 16
    ],
)
def test_tokens_equal_pad_then_normalise(cfg, jit_path):
    tok = _tok(**cfg)
    rng = np.random.default_rng(len(cfg))
    for n in (1, 399, 400, 401, 2000, 2560, 2561, 16000, 40000):  # 0..248 frames: cut, exact, partial patches
        wav = (rng.standard_normal(n) * rng.uniform(0.01, 1.0)).astype(np.float32)
        (rec,) = tok.tokenize(Audio(waveform=wav, sample_rate=16000), source="x")
        expected = _plain_tokens(tok, wav)
        assert rec.tokens.dtype == np.float16 and rec.tokens.flags.c_contiguous
        np.testing.assert_array_equal(rec.tokens.view(np.uint16), expected.view(np.uint16))  # bit for bit
    # with numba, F16C and MKL the tokens came from the one-call kernel (waveform to float16 patches)
    fused = (
        jit_path == "jit"
        and _kernels.FUSED_TOKENS
        and _mkl_fft.available()
        and tok.config.num_mel_bins % 16 == 0
    )
    assert tok._kaldi.fused_tokens() == fused
    r1, r2 = (tok.tokenize(Audio(waveform=wav, sample_rate=16000))[0] for _ in range(2))
    assert not np.shares_memory(r1.positions, r2.positions) and r1.positions.flags.writeable


def test_tokens_match_plain_kaldi_fbank_within_one_float16_step():
    """The stored tokens against AudioMAE's formulation with the uncached ``kaldi.fbank``."""
    tok = _tok()
    c = tok.config
    rng = np.random.default_rng(7)
    for n in (400, 9536, 16000):
        wav = (rng.standard_normal(n) * 0.2).astype(np.float32)
        (rec,) = tok.tokenize(Audio(waveform=wav, sample_rate=16000), source="x")
        w = torch.from_numpy(wav)
        fb = _kaldi_fbank(w - w.mean(), 16000, c.num_mel_bins, c.frame_shift_ms)
        fb = torch.nn.functional.pad(fb, (0, 0, 0, c.target_frames - fb.shape[0]), value=c.pad_value)
        x = ((fb - c.norm_mean) / (2.0 * c.norm_std)).to(torch.float16).numpy()
        p = c.patch_size
        ref = (
            x.reshape(c.target_frames // p, p, c.num_mel_bins // p, p)
            .transpose(0, 2, 1, 3)
            .reshape(-1, p * p)
        )
        # float32 rounding of the fbank moves a token by at most one float16 rounding step (relative
        # 2^-10; absolute near 0, where a step is tiny), and rarely
        got, want = rec.tokens.astype(np.float32), ref.astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2**-10, atol=1e-4)
        assert (got == want).mean() > 0.99


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 48000])
def test_read_resamples_as_torchaudio_functional(tmp_path, sr):
    """The numpy SincResampler is torchaudio's resample: its kernel within float32 rounding (sine and
    cosine rounded from float64, where torch's float32 ones may be a few units in the last place off),
    the output within 2e-7 of unit-scale audio, and the same length."""
    import torchaudio

    wav = (np.random.default_rng(sr).standard_normal(sr // 3) * 0.2).astype(np.float32)
    path = _wav(tmp_path / f"{sr}.wav", wav, sr)
    tok = _tok()
    ref = torchaudio.functional.resample(torch.from_numpy(wav), sr, 16000).numpy()
    for _ in range(2):  # the second read uses the cached kernel
        out = tok.read(path).waveform
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-7)
    assert list(tok._resamplers) == [sr]
    kernel = torchaudio.transforms.Resample(sr, 16000, dtype=torch.float32).kernel[:, 0, :].T.numpy()
    np.testing.assert_allclose(tok._resamplers[sr].kernel, kernel, rtol=0, atol=2.5e-7)


@pytest.mark.parametrize("orig,new", [(8000, 16000), (16000, 8000), (3, 2)])
def test_sinc_resampler_lengths_and_a_tone(orig, new):
    """Lengths are ceil(N * new / orig) as torchaudio's; a tone well below both Nyquists survives
    (away from the edges, where the zero padding tapers it)."""
    from maskloom.tokenizers.audio import SincResampler

    r = SincResampler(orig, new)
    for n in (1, 2, 7, 100):
        assert r(np.ones(n, np.float32)).shape == (-(-n * new // orig),)
    if orig > 100:
        t = np.arange(orig) / orig
        y = r(np.sin(2 * np.pi * 440 * t).astype(np.float32))
        want = np.sin(2 * np.pi * 440 * np.arange(new) / new)
        np.testing.assert_allclose(y[200:-200], want[200:-200], atol=2e-3)
    with pytest.raises(ValueError, match="positive"):
        SincResampler(0, 16000)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (22050, 16000), (8000, 16000), (48000, 16000), (3, 2)])
def test_sinc_resampler_without_its_kernel_computes_the_same(orig, new):
    """The direct evaluation (rates whose kernel would be huge) against the kernel product: within
    2.5e-5 of unit-scale audio, the kernel's own float32 error (its times carry float32 rounding
    scaled by the filter's base rate: 22,050 Hz against float64 differs by ~2e-5)."""
    from maskloom.tokenizers.audio import SincResampler

    x = (np.random.default_rng(orig).standard_normal(orig // 3 + 7) * 0.3).astype(np.float32)
    direct = SincResampler(orig, new, max_kernel=0)
    assert direct.kernel is None
    y = direct(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, SincResampler(orig, new)(x), rtol=0, atol=2.5e-5)


def test_sinc_resampler_rates_without_a_common_divisor_stay_small(tmp_path):
    """44,101 -> 16,000 Hz would need a 2.8 GB kernel (torchaudio builds it); without it, 2 s of a
    440 Hz tone come out as 32,000 samples of the tone, and such a file tokenizes."""
    from maskloom.tokenizers.audio import SincResampler

    r = SincResampler(44101, 16000)
    assert r.kernel is None
    x = np.sin(2 * np.pi * 440 * np.arange(2 * 44101) / 44101).astype(np.float32)
    y = r(x)
    assert y.shape == (32000,)
    want = np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    np.testing.assert_allclose(y[200:-200], want[200:-200], atol=1e-3)
    path = _wav(tmp_path / "odd.wav", (x[:44101] * 0.5).astype(np.float32), 44101)
    tok = _tok()
    assert tok.read(path).waveform.shape == (16000,)
    (rec,) = tok(path)
    assert rec.meta["frames"] == 98  # 1 s at a 10 ms shift, 25 ms windows


def test_numpy_constants_equal_torchaudio():
    """The mel filterbank bit for bit; the Hann window within a unit in the last place."""
    from torchaudio.compliance import kaldi

    from maskloom.tokenizers.audio import hann_window, mel_banks

    for mel, sr in ((128, 16000), (80, 16000), (64, 8000), (128, 22050), (128, 44100), (23, 16000)):
        w = int(sr * 0.025)
        fft = 2 ** (w - 1).bit_length()
        ref, _ = kaldi.get_mel_banks(mel, fft, sr, 20.0, 0.0, 100.0, -500.0, 1.0)
        np.testing.assert_array_equal(mel_banks(mel, fft, sr), ref.numpy())
        tw = torch.hann_window(w, periodic=False, dtype=torch.float32).numpy()
        np.testing.assert_allclose(hann_window(w), tw, rtol=0, atol=2**-24)
        assert hann_window(w)[0] == 0.0
    assert hann_window(1).tolist() == [1.0]


def test_tokens_vouch_for_their_values_only_when_checked(jit_path):
    """The compiled kernel finds whether the tokens are finite while writing them (Record.finite, which
    spares validation a 256 kB scan); a NaN in the waveform still reaches validation as non-finite."""
    from maskloom import tables

    tok = _tok()
    (rec,) = tok.tokenize(Audio(waveform=_sine(0.5), sample_rate=16000), source="x")
    assert rec.finite is (jit_path == "jit") and np.isfinite(rec.tokens).all()
    wav = _sine(0.5)
    wav[3000] = np.nan
    (bad,) = tok.tokenize(Audio(waveform=wav, sample_rate=16000), source="nan.wav")
    assert bad.finite is False and not np.isfinite(bad.tokens).all()
    with pytest.raises(tables.TableError, match="'nan.wav'.*tokens contain non-finite values"):
        tables.validate_record(bad, tok.spec())
    nan_pad = AudioTokenizer(AudioConfig(target_frames=128, pad_value=float("nan")))
    (r,) = nan_pad.tokenize(Audio(waveform=_sine(0.5), sample_rate=16000), source="x")
    assert r.finite is False


@pytest.mark.skipif(not _mkl_fft.available(), reason="torch without MKL's DFTI exported")
def test_kept_mkl_plans_give_the_bits_of_torch_rfft(jit_path):
    """KaldiFbank's CPU FFT (maskloom._mkl_fft, plans kept per frame count) against the same filterbank
    through torch.fft.rfft (the fallback where MKL's DFTI is not exported): identical bits."""
    fast = KaldiFbank(sample_rate=16000, num_mel_bins=128, frame_shift_ms=10.0)
    plain = KaldiFbank(sample_rate=16000, num_mel_bins=128, frame_shift_ms=10.0)
    plain._rfft = None
    assert fast._rfft is not None
    rng = np.random.default_rng(1)
    for n in (400, 8000, 16000, 8000, 40000):
        wav = (rng.standard_normal(n) * 0.3).astype(np.float32)
        np.testing.assert_array_equal(fast.numpy(wav).view(np.uint32), plain.numpy(wav).view(np.uint32))


def test_a_cpu_worker_tokenizes_audio_without_importing_torch(tmp_path):
    """``import torch`` is ~1 s of CPU in every preprocessing worker; the CPU path (decode, resample,
    filterbank through MKL loaded alone, compiled kernels) does not need it. Importing torch later in
    the same process still works, with the same FFT bits."""
    import subprocess
    import sys

    path = _wav(tmp_path / "a.wav", (np.sin(np.arange(4000) / 7.0) * 0.3).astype(np.float32), 8000)
    code = (
        "import sys\n"
        "from maskloom import _kernels, _mkl_fft\n"
        "from maskloom.tokenizers import get_tokenizer\n"
        f"(rec,) = get_tokenizer('audio', {{'target_frames': 64}})({str(path)!r})\n"
        "assert rec.tokens.shape == (4 * 8, 256), rec.tokens.shape\n"
        "print(_kernels.ENABLED and _mkl_fft.available(), 'torch' in sys.modules)\n"
        # torch imported afterwards finds its library loaded already, and both FFTs agree
        "import numpy as np, torch\n"
        "x = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)\n"
        "if _mkl_fft.available():\n"
        "    assert np.array_equal(_mkl_fft.RealFFT(512)(x), torch.fft.rfft(torch.from_numpy(x)).numpy())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    fast_path, imported = out.stdout.split()
    if fast_path != "True":
        pytest.skip("numba or MKL's DFTI missing: the fallbacks use torch")
    assert imported == "False"


def test_tokenizing_in_a_thread_keeps_the_kernels_scratch_alive():
    """The compiled filterbank hands its scratch arrays to LLVM code; numba must not free them first.
    (Passing ``.ctypes.data`` addresses made that address the arrays' last use: numba freed them
    before the FFT and the mel sums read them. A thread's malloc arena unmaps freed memory sooner
    than the main heap does, so this loop crashed within a few hundred clips.) A subprocess, so that
    a crash fails the test instead of killing pytest."""
    code = (
        "import threading\n"
        "import numpy as np\n"
        "from maskloom.tokenizers.audio import Audio, AudioTokenizer\n"
        "tok = AudioTokenizer({'target_frames': 1024})\n"
        "rng = np.random.default_rng(0)\n"
        "def run():\n"
        "    for _ in range(600):\n"
        "        n = int(rng.integers(4000, 40000))\n"
        "        wav = (rng.standard_normal(n) * 0.1).astype(np.float32)\n"
        "        tok.tokenize(Audio(waveform=wav, sample_rate=16000))\n"
        "    print('ok')\n"
        "t = threading.Thread(target=run)\n"
        "t.start()\n"
        "t.join()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_a_used_tokenizer_pickled_to_another_process_tokenizes_the_same(tmp_path):
    """The compiled path binds MKL's function address; a tokenizer shipped to a worker after use must
    bind its own process's (a stale address would crash the worker)."""
    tok = _tok()
    raw = Audio(waveform=_sine(0.4), sample_rate=16000)
    want = tok.tokenize(raw, source="x")[0].tokens
    fused = tok._kaldi._fused
    if fused is not None:
        again = pickle.loads(pickle.dumps(tok._kaldi))
        assert again._fused.fft is again._rfft and again._fused.consts[1][1] == again._rfft.address
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps((tok, raw)))
    code = (
        "import pickle, sys\n"
        "tok, raw = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "sys.stdout.buffer.write(tok.tokenize(raw, source='x')[0].tokens.tobytes())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "tok.pkl")], capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout == want.tobytes()


@pytest.mark.parametrize("frames", [128, 1024])
def test_tokenize_gives_the_same_record_for_any_layout_of_the_waveform(frames):
    """A contiguous float32 waveform takes the lean one-call path where it runs; float64 and strided
    waveforms take the general one. Same tokens (bit for bit), positions and meta either way."""
    tok = _tok(target_frames=frames)
    rng = np.random.default_rng(5)
    wav = (0.3 * _sine(0.73) + 0.05 * rng.standard_normal(int(0.73 * 16000))).astype(np.float32)
    strided = np.repeat(wav, 2)[::2]
    assert not strided.flags.c_contiguous and (strided == wav).all()
    recs = [
        tok.tokenize(Audio(waveform=w, sample_rate=16000), source="x")[0]
        for w in (wav, wav.astype(np.float64), strided)
    ]
    for r in recs[1:]:
        assert r.tokens.dtype == np.float16 and r.tokens.shape == recs[0].tokens.shape == (
            frames // 16 * 8,
            256,
        )
        assert (r.tokens.view(np.uint16) == recs[0].tokens.view(np.uint16)).all()
        assert (
            (r.positions == recs[0].positions).all() and r.meta == recs[0].meta and r.finite == recs[0].finite
        )
    assert recs[0].meta["frames"] == 1 + (len(wav) - 400) // 160 == recs[0].meta["total_frames"]


# ---- WebDataset tar shards -----------------------------------------------------------------------


def _same(a, b) -> bool:
    return (a.id, a.source, a.label, a.meta) == (b.id, b.source, b.label, b.meta) and np.array_equal(
        a.tokens.view(np.uint16), b.tokens.view(np.uint16)
    ) and np.array_equal(a.positions, b.positions)  # fmt: skip


def _long_clip() -> np.ndarray:
    """3 windows of 32 frames and 21 frames at 16 kHz: 4 windows with max_windows=0."""
    return np.random.default_rng(1).uniform(-0.5, 0.5, 3 * 32 * 160 + 20 * 160 + 400).astype(np.float32)


@pytest.mark.parametrize("max_windows", [1, 0])
def test_tar_samples_give_the_records_of_the_same_files(tmp_path, max_windows):
    """A sample's records are those of its audio as a file (tokens bit for bit, meta), with ids
    ``<tar>#<key>`` (``#<key>#k`` for window k), the ``cls`` label and the member's name."""
    from maskloom.tokenizers.audio import TarAudio, TarAudios

    files = {
        "a.wav": _wav(tmp_path / "a.wav", _sine(0.6, freq=300.0)),
        "b.flac": _wav(
            tmp_path / "b.flac", np.stack([_sine(0.5), _sine(0.5, freq=90.0)], 1), 22050, "PCM_16"
        ),
        "c.wav": _wav(tmp_path / "c.wav", _long_clip()),  # decoded only as far as its tokens need
    }
    members = [("./train/a.WAV", open(files["a.wav"], "rb").read()), ("./train/a.cls", b"7\n"),
               ("./train/a.json", b"{}"),
               ("train/b.json", b"{}"), ("train/b.flac", open(files["b.flac"], "rb").read()),
               ("train/c.wav", open(files["c.wav"], "rb").read()), ("train/c.cls", b"2")]  # fmt: skip
    tar = write_tar(tmp_path / "shard-000.tar", members)
    tok = _tok(target_frames=32, max_windows=max_windows)
    recs = tok(tar)
    windows = {1: [1, 1, 1], 0: [2, 1, 4]}[max_windows]  # 58, 35 and 117 frames
    ids, want = [], []
    for key, name, n in zip(("train/a", "train/b", "train/c"), files, windows, strict=True):
        ids += [f"{tar}#{key}"] + [f"{tar}#{key}#{k}" for k in range(1, n)]
        want += tok(files[name])
        assert [r.id for r in tok(files[name])] == [f"{files[name]}#{k}" for k in range(n)]
    assert [r.id for r in recs] == ids
    assert [r.label for r in recs] == [7] * windows[0] + [None] * windows[1] + [2] * windows[2]
    assert [r.meta["member"] for r in recs] == (
        ["./train/a.WAV"] * windows[0] + ["train/b.flac"] * windows[1] + ["train/c.wav"] * windows[2]
    )
    assert all(r.source == tar for r in recs)
    for rec, ref in zip(recs, want, strict=True):
        assert np.array_equal(rec.tokens.view(np.uint16), ref.tokens.view(np.uint16)), rec.id
        np.testing.assert_array_equal(rec.positions, ref.positions)
        assert rec.meta == {**ref.meta, "member": rec.meta["member"]}
    # read(): the samples decoded, the partial decode as for files; tokenize(read()) == the stream
    raw = tok.read(tar)
    assert isinstance(raw, TarAudios) and [s.key for s in raw] == ["train/a", "train/b", "train/c"]
    assert raw[0] == TarAudio("train/a", raw[0].audio, 7, "./train/a.WAV")
    c_file = tok.read(files["c.wav"])
    np.testing.assert_array_equal(raw[2].audio.waveform, c_file.waveform)
    assert (
        raw[2].audio.total_samples == c_file.total_samples == (_long_clip().shape[0] if max_windows else None)
    )
    assert raw[2].audio.waveform.shape[0] == (5360 if max_windows else _long_clip().shape[0])
    streamed = tok.iter_records(tar)
    assert not isinstance(streamed, list)
    streamed = list(streamed)
    assert len(streamed) == len(recs) and all(map(_same, recs, streamed))
    assert all(map(_same, recs, tok.tokenize(raw, source=tar)))
    tok.render(raw, str(tmp_path / "r.png"))  # the first clip's spectrogram
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tar_members_libsndfile_lacks_are_decoded_with_ffmpeg(tmp_path):
    m4a = _encode(tmp_path / "s.m4a", "aac", _sine(1.0, sr=44100, amp=0.3), 44100)
    tar = write_tar(tmp_path / "m.tar", [("s.m4a", open(m4a, "rb").read()), ("s.cls", b"1")])
    tok = _tok()
    (rec,), (ref,) = tok(tar), tok(m4a)
    assert (rec.id, rec.label, rec.meta["member"]) == (f"{tar}#s", 1, "s.m4a")
    assert np.array_equal(rec.tokens.view(np.uint16), ref.tokens.view(np.uint16))


def test_tar_cls_labels(tmp_path):
    clip = open(_wav(tmp_path / "x.wav", _sine(0.1)), "rb").read()
    members = [("a.wav", clip), ("a.cls", b"12"), ("b.wav", clip), ("b.cls", b"\t3 \r\n"),
               ("c.wav", clip), ("d.wav", clip), ("d.cls", b"-1\n")]  # fmt: skip
    tar = write_tar(tmp_path / "l.tar", members)
    assert [(r.id.split("#")[1], r.label) for r in _tok()(tar)] == [
        ("a", 12),
        ("b", 3),
        ("c", None),
        ("d", None),
    ]


def test_bad_tar_samples_are_skipped_with_one_warning(tmp_path, caplog):
    import logging

    good = []
    for i in range(4):
        flac = _wav(tmp_path / f"s{i}.flac", _sine(0.2 + 0.1 * i), subtype="PCM_16")
        good.append((f"s{i}.flac", open(flac, "rb").read()))
    pcm = open(_wav(tmp_path / "t.wav", _sine(0.3), subtype="PCM_16"), "rb").read()  # 9,600 bytes of data
    bad = [("b0.wav", b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4), ("b1.wav", pcm[:-1000])]
    tar = write_tar(tmp_path / "some-bad.tar", good[:2] + bad + good[2:])
    tok = _tok()
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.audio"):
        recs = tok(tar)
    assert [r.id.split("#")[1] for r in recs] == ["s0", "s1", "s2", "s3"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{tar}: skipped 2 of 6 samples: b0 (corrupt: cannot decode audio: Error in WAV file. No 'data' chunk marker.); "
        "b1 (corrupt: truncated WAV: data chunk declares 9600 bytes but the file holds 8600)"
    ]
    # alone, the truncated member is the tar's error; so is a tar of images (no audio member)
    with pytest.raises(TokenizeError) as e:
        tok(write_tar(tmp_path / "cut.tar", bad[1:]))
    assert (e.value.kind, e.value.reason) == (
        "corrupt",
        "sample b1: truncated WAV: data chunk declares 9600 bytes but the file holds 8600 (1 of 1 samples are unusable)",
    )
    images = write_tar(
        tmp_path / "images.tar", [("a.png", b"\x89PNG"), ("a.cls", b"1"), ("b.jpg", b"\xff\xd8")]
    )
    for run in (tok, lambda p: list(tok.iter_records(p))):
        with pytest.raises(TokenizeError) as e:
            run(images)
        assert (e.value.source, e.value.kind, e.value.reason) == (
            images,
            "unsupported",
            "sample a: no audio member (a.png, a.cls) (2 of 2 samples are unusable)",
        )
    assert {".tar", ".tar.gz", ".tgz"} <= set(AudioTokenizer.extensions)


def test_conformance_kit_with_a_tar(tmp_path):
    clips = [_sine(0.2 + 0.3 * i, freq=250.0 * (i + 1)) for i in range(3)]
    members = []
    for i, clip in enumerate(clips):
        members += [
            (f"k/{i}.wav", open(_wav(tmp_path / f"{i}.wav", clip), "rb").read()),
            (f"k/{i}.cls", b"%d" % i),
        ]
    tar = write_tar(tmp_path / "shard.tar", members)
    plain = _wav(tmp_path / "plain.wav", _sine(0.4))
    tok = _tok()

    def compare(raw, out, rec):
        from maskloom.tokenizers.audio import TarAudios

        if isinstance(raw, TarAudios):
            (raw,) = [s.audio for s in raw if rec.id.endswith("#" + s.key)]
        fb = tok.fbank(raw.waveform).numpy()[: rec.meta["frames"]]
        np.testing.assert_allclose(out, fb, atol=0.03)

    assert check_tokenizer(tok, [tar, plain], compare=compare) == {
        "sources": 2,
        "records": 4,
        "tokens": 4 * 64,
    }


def test_without_padding_tokens_a_record_holds_its_real_rows_only(tmp_path):
    """pad_tokens=False: a 0.3 s clip keeps ceil(frames / 16) time rows of the grid (the last one
    padded as before), exactly the first rows of the padded record; a clip as long as the grid, and
    every window with max_windows, are the same records; detokenize gives the same filterbank."""
    from maskloom.testing import check_tokenizer

    short = _wav(tmp_path / "short.wav", _sine(0.3, amp=0.2))
    long = _wav(tmp_path / "long.wav", _sine(1.5, amp=0.2))
    for kw in ({}, {"max_windows": 0}):
        padded, compact = _tok(**kw), _tok(pad_tokens=False, **kw)
        for src in (short, long):
            full, kept = padded(src), compact(src)
            assert [r.id for r in kept] == [r.id for r in full]
            for a, b in zip(full, kept):
                rows = -(-b.meta["frames"] // 16)
                assert b.tokens.shape == (min(rows, 8) * 8, 256) and b.meta == a.meta
                np.testing.assert_array_equal(b.tokens, a.tokens[: len(b.tokens)])
                np.testing.assert_array_equal(b.positions, a.positions[: len(b.tokens)])
                np.testing.assert_array_equal(compact.detokenize(b), padded.detokenize(a))
    (r,) = _tok(pad_tokens=False)(short)
    assert r.meta["frames"] == 28 and r.num_tokens == 2 * 8  # 28 frames: two rows of 16, not 8 rows
    assert _tok(pad_tokens=False).fingerprint() != _tok().fingerprint()
    check_tokenizer(_tok(pad_tokens=False), [short, long])
