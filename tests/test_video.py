"""
Tests for data/video.py. Every video is written here with write_video, and each frame carries its own index in
its pixels (full-height black/white bars, one per bit: robust to h264 and to resizing), so the tests check which
source frames were actually decoded, not just how many.
"""
from fractions import Fraction

import av
import numpy as np
import pytest

import data.video as video
from data.video import SampledVideo, fit_size, load_audio, probe, sample_frames, write_video

BITS = 10  # frame indices up to 1023


def coded_frame(i, height, width):
    """Frame i: bit b of i is the b-th vertical bar (white = 1), plus a faint gradient so it is not flat."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 2] = np.linspace(0, 60, width, dtype=np.uint8)[None, :]
    for b in range(BITS):
        if (i >> b) & 1:
            frame[:, b * width // BITS:(b + 1) * width // BITS] = 255
    return frame


def read_code(frame, coded_width, stored_width):
    """The index written by coded_frame(width=coded_width) into a video stored stored_width wide (write_video pads
    odd widths by one column), from a frame resized to any width."""
    height, width = frame.shape[:2]
    scale = width / stored_width
    value = 0
    for b in range(BITS):
        x0, x1 = b * coded_width // BITS * scale, (b + 1) * coded_width // BITS * scale
        q = (x1 - x0) / 4  # only the middle half of each bar: edges blur under compression and resizing
        patch = frame[height // 4:3 * height // 4, int(round(x0 + q)):int(round(x1 - q)), :2]
        value |= int(patch.mean() > 128) << b
    return value


def make_video(path, n, fps, height=61, width=97, audio_hz=None, sr=16000, gop=12, codec=None):
    audio = None
    if audio_hz:
        t = np.arange(int(round(n / float(fps) * sr))) / sr
        audio = (0.5 * np.sin(2 * np.pi * audio_hz * t)).astype(np.float32)
    write_video(path, (coded_frame(i, height, width) for i in range(n)), fps, audio=audio, sample_rate=sr,
                gop=gop, codec=codec)
    return str(path)


# (name, frames, fps): three frame rates, the NTSC one with a time base that is not a multiple of 1/fps in ms
VIDEOS = [("fps10", 53, 10), ("fps25", 137, 25), ("ntsc", 100, Fraction(30000, 1001))]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {name: (make_video(root / f"{name}.mp4", n, fps), n, fps) for name, n, fps in VIDEOS}


def codes(sampled, coded_width=97):
    stored = coded_width + coded_width % 2
    return [read_code(f, coded_width, stored) for f in sampled.frames]


# --------------------------------------------------------------------------------------------------------------
# fit_size


def test_fit_size_matches_qwen_smart_resize():
    qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(x) for x in rng.integers(8, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        m = int(rng.choice([28, 32]))
        lo = int(rng.integers(1, 16)) * m * m
        hi = lo + int(rng.integers(1, 2000)) * m * m
        assert fit_size(h, w, m, lo, hi) == tuple(qwen.smart_resize(h, w, m, lo, hi)), (h, w, m, lo, hi)


@pytest.mark.parametrize("height,width", [(1080, 1920), (1920, 1080), (720, 1280), (480, 640), (61, 97), (7, 5),
                                          (4000, 3000), (100, 2000)])
@pytest.mark.parametrize("multiple", [28, 32])
def test_fit_size_rules(height, width, multiple):
    lo, hi = multiple * multiple * 4, 448 * 448
    h, w = fit_size(height, width, multiple, lo, hi)
    assert h % multiple == 0 and w % multiple == 0
    assert lo <= h * w <= hi
    # each side is off its exact scaled length by less than one multiple, so the aspect ratio by at most that
    assert abs(np.log((h / w) / (height / width))) <= multiple / h + multiple / w


def test_fit_size_rejects_extreme_aspect():
    with pytest.raises(ValueError):
        fit_size(10, 5000)


# --------------------------------------------------------------------------------------------------------------
# probe and sampling


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
def test_probe(videos, name):
    path, n, fps = videos[name]
    info = probe(path)
    assert info.path == path and info.num_frames == n and not info.has_audio
    assert info.fps == pytest.approx(float(fps))
    assert info.duration == pytest.approx(n / float(fps), abs=1e-3)
    assert (info.height, info.width) == (62, 98)  # odd 61x97 padded to even for yuv420p


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
@pytest.mark.parametrize("num", [1, 2, 7, 16, 40])
def test_num_frames_picks_exact_frames(videos, name, num):
    path, n, fps = videos[name]
    v = sample_frames(path, num_frames=num)
    assert len(v.indices) == num == len(v.frames) == len(v.timestamps)
    assert v.indices[0] == 0 and (num == 1 or v.indices[-1] == n - 1)
    gaps = np.diff(v.indices)
    assert np.all(gaps > 0) and (num == 1 or np.ptp(gaps) <= 1)  # uniform up to rounding
    assert v.indices == [int(round(k * (n - 1) / (num - 1))) if num > 1 else 0 for k in range(num)]
    assert codes(v) == v.indices  # the pixels say these are the frames we claim
    np.testing.assert_allclose(v.timestamps, np.array(v.indices) / float(fps), atol=1e-4)


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
@pytest.mark.parametrize("rate", [0.7, 2, 3.5, 10])
def test_fps_picks_exact_frames(videos, name, rate):
    path, n, fps = videos[name]
    v = sample_frames(path, fps=rate, max_frames=10_000)
    # the frame on screen at times 0, 1/rate, 2/rate, ... for as long as the video lasts
    duration = n / float(fps)
    want = sorted({min(n - 1, int(np.floor(k / rate * float(fps) + 1e-6)))
                   for k in range(int(np.ceil(duration * rate)) + 1) if k / rate < duration - 1e-9})
    if rate >= float(fps):
        want = list(range(n))
    assert v.indices == want
    assert codes(v) == want
    np.testing.assert_allclose(v.timestamps, np.array(want) / float(fps), atol=1e-4)


def test_fps_above_source_gives_every_frame_once(videos):
    path, n, fps = videos["fps10"]
    v = sample_frames(path, fps=100, max_frames=10_000)
    assert v.indices == list(range(n)) and codes(v) == v.indices


def test_max_frames_thins_uniformly(videos):
    path, n, fps = videos["fps25"]
    full = sample_frames(path, fps=25, max_frames=10_000)
    assert len(full.indices) == n
    v = sample_frames(path, fps=25, max_frames=9)
    assert len(v.indices) == 9 and set(v.indices) <= set(full.indices)
    assert v.indices[0] == 0 and v.indices[-1] == n - 1
    assert np.ptp(np.diff(v.indices)) <= 1
    assert codes(v) == v.indices


def test_never_more_frames_than_the_video(videos):
    path, n, fps = videos["fps10"]
    v = sample_frames(path, num_frames=5 * n)
    assert v.indices == list(range(n)) and codes(v) == v.indices and len(v.frames) == n


@pytest.mark.parametrize("multiple,max_pixels", [(28, 448 * 448), (32, 64 * 64 * 2), (28, 28 * 28 * 6)])
def test_resized_shape(videos, multiple, max_pixels):
    path, n, fps = videos["fps25"]
    v = sample_frames(path, num_frames=4, size_multiple=multiple, max_pixels=max_pixels, min_pixels=multiple ** 2)
    t, h, w, c = v.frames.shape
    assert v.frames.dtype == np.uint8 and c == 3 and t == 4
    assert h % multiple == 0 and w % multiple == 0 and h * w <= max_pixels
    assert (h, w) == fit_size(62, 98, multiple, multiple ** 2, max_pixels)
    assert w >= h  # landscape stays landscape


def test_metadata(videos):
    path, n, fps = videos["ntsc"]
    v = sample_frames(path, num_frames=8)
    meta = v.metadata()
    assert set(meta) == {"total_num_frames", "fps", "duration", "frames_indices"}
    assert meta["total_num_frames"] == n and type(meta["total_num_frames"]) is int
    assert meta["fps"] == pytest.approx(30000 / 1001) and type(meta["fps"]) is float
    assert meta["duration"] == pytest.approx(n * 1001 / 30000, abs=1e-3)
    assert meta["frames_indices"] == v.indices and all(type(i) is int for i in meta["frames_indices"])
    assert isinstance(v, SampledVideo) and v.total_frames == n


def test_sample_windows(tmp_path):
    path = make_video(tmp_path / "a.mp4", 80, 4, gop=8)  # 20 s at 4 fps
    w1, w2 = video.sample_windows(path, [(5, 10), (15, 20)], 4)  # frames 20..39 and 60..79, one decoder pass
    for v, idx in ((w1, [20, 26, 33, 39]), (w2, [60, 66, 73, 79])):
        assert codes(v) == idx  # the right frames
        # each window described as a video of its own, for the processor's timing
        assert v.indices == [i - idx[0] for i in idx] and v.total_frames == 20 and v.duration == 5 and v.fps == 4
    with pytest.raises(ValueError, match="garbage.mp4"):
        video.sample_windows(bad_file("garbage", tmp_path), [(0, 5)], 4)
    # a window the file cannot deliver is a ValueError in its place; the windows before it are still returned
    ok, cut = video.sample_windows(truncated(tmp_path, 0.5), [(0, 1), (4, 4.8)], 4)
    assert codes(ok) == [0, 8, 16, 24] and isinstance(cut, ValueError) and "cut_0.5.mp4" in str(cut)


def test_mpeg4_fallback_codec(tmp_path):
    path = make_video(tmp_path / "m.mp4", 40, 25, codec="mpeg4")
    v = sample_frames(path, num_frames=6)
    assert codes(v) == v.indices == [round(k * 39 / 5) for k in range(6)]


def test_even_size_is_not_padded(tmp_path):
    path = make_video(tmp_path / "even.mp4", 5, 25, height=64, width=96)
    info = probe(path)
    assert (info.height, info.width) == (64, 96)


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", [np.zeros((8, 8, 3), np.float32)], 25)
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "e.mp4", [], 25)


# --------------------------------------------------------------------------------------------------------------
# seeking on a longer video: sparse targets must seek (decode less than the whole file) and still be exact


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    n = 900  # 36 s at 25 fps, a keyframe every 1 s; x264 uses B-frames, so pts and dts differ
    return make_video(tmp_path_factory.mktemp("long") / "long.mp4", n, 25, height=48, width=80, gop=25), n


def count_decoded(monkeypatch):
    counter = {"frames": 0}
    original = video._decoded

    def counting(*args):
        for item in original(*args):
            counter["frames"] += 1
            yield item
    monkeypatch.setattr(video, "_decoded", counting)
    return counter


@pytest.mark.parametrize("num", [3, 6, 10])
def test_sparse_targets_seek_and_stay_exact(long_video, monkeypatch, num):
    path, n = long_video
    counter = count_decoded(monkeypatch)
    v = sample_frames(path, num_frames=num)  # targets > SEEK_GAP_S apart
    assert codes(v, coded_width=80) == v.indices
    assert counter["frames"] < n / 2  # seeking skipped most of the file


def test_dense_targets_decode_sequentially(long_video, monkeypatch):
    path, n = long_video
    counter = count_decoded(monkeypatch)
    v = sample_frames(path, fps=5)
    assert codes(v, coded_width=80) == v.indices == list(range(0, n, 5))
    assert counter["frames"] <= n  # no frame decoded twice


@pytest.mark.parametrize("num", [7, 61, 200, 450, 900])
def test_seek_everywhere_stays_exact(long_video, monkeypatch, num):
    # Seek before every target however close: every target lands somewhere else in a GOP, some just before a
    # keyframe, where an mp4 seek (by dts) overshoots and must back off.
    path, n = long_video
    monkeypatch.setattr(video, "SEEK_GAP_S", 0.0)
    v = sample_frames(path, num_frames=num)
    assert len(v.indices) == num and codes(v, coded_width=80) == v.indices


class LateSeek:
    """A container whose seeks land 0.6 s after where they were asked to, like a demuxer that seeks by decode
    timestamp: the keyframe found can be past the target, and sample_frames must notice and back off."""

    def __init__(self, container):
        self.container = container

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def seek(self, offset, stream, backward=True):
        self.container.seek(offset + int(0.6 / stream.time_base), stream=stream, backward=backward)


@pytest.mark.parametrize("num", [5, 11, 40])
def test_seek_past_target_backs_off(long_video, monkeypatch, num):
    path, n = long_video
    original = video._open
    monkeypatch.setattr(video, "_open", lambda p: LateSeek(original(p)))
    monkeypatch.setattr(video, "SEEK_GAP_S", 0.0)
    v = sample_frames(path, num_frames=num)
    assert len(v.indices) == num and codes(v, coded_width=80) == v.indices


def test_long_keyframe_interval_is_learned(tmp_path, monkeypatch):
    # Keyframes every 10 s, targets every 3 s: a seek lands on the keyframe behind us, which is wasted work.
    # After such a seek the sampler knows the interval is longer than the gap and decodes forward instead,
    # so in all it decodes less than the file plus one keyframe interval.
    n, gop = 900, 250
    path = make_video(tmp_path / "gop.mp4", n, 25, height=48, width=80, gop=gop)
    counter = count_decoded(monkeypatch)
    v = sample_frames(path, num_frames=13)
    assert codes(v, coded_width=80) == v.indices
    assert counter["frames"] <= n + gop


def test_fps_sampling_on_long_video(long_video):
    path, n = long_video
    v = sample_frames(path, fps=0.5)  # one frame every 50 source frames
    assert v.indices == list(range(0, n, 50)) and codes(v, coded_width=80) == v.indices


# --------------------------------------------------------------------------------------------------------------
# audio


def test_load_audio(tmp_path):
    n, fps, sr = 50, 25, 16000
    path = make_video(tmp_path / "a.mp4", n, fps, audio_hz=440, sr=sr)
    assert probe(path).has_audio
    wav = load_audio(path, sr=sr)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) / sr - n / fps) < 0.1  # aac pads the last 1024-sample frame
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.fft.rfftfreq(len(wav), 1 / sr)[spectrum.argmax()] == pytest.approx(440, abs=3)
    assert 0.3 < np.abs(wav).max() < 0.7  # amplitude 0.5 survives
    half = load_audio(path, sr=8000)
    assert abs(len(half) - len(wav) / 2) < 0.02 * len(wav)
    v = sample_frames(path, num_frames=5)  # the audio track does not disturb video sampling
    assert codes(v) == v.indices


# --------------------------------------------------------------------------------------------------------------
# bad inputs: each a ValueError naming the file


def write_audio_only(path, sr=16000, seconds=1.0):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=sr, layout="mono")
        samples = (0.3 * np.sin(np.arange(int(sr * seconds)) / sr * 2 * np.pi * 300)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = sr, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def write_zero_frames(path):
    # An mp4 muxer drops an empty track altogether; an avi keeps a video stream with no frames in it.
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    return str(path)


def write_png(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(coded_frame(5, 32, 32), format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def truncated(tmp_path, keep):
    """A 120-frame video cut to its first `keep` fraction of bytes."""
    path = make_video(tmp_path / "whole.mp4", 120, 25, gop=10)
    data = open(path, "rb").read()
    out = tmp_path / f"cut_{keep}.mp4"
    out.write_bytes(data[:int(len(data) * keep)])
    return str(out)


def bad_file(kind, d):
    if kind == "missing":
        return str(d / "nope.mp4")
    if kind == "directory":
        return str(d)
    if kind == "audio_only":
        return write_audio_only(d / "speech.m4a")
    if kind == "image":  # FFmpeg reads a still image as a one-frame video; we do not
        return write_png(d / "still.png")
    if kind == "zero_frames":
        return write_zero_frames(d / "zero.avi")
    if kind == "header_cut":
        return truncated(d, 0.01)  # cut inside the index at the front: nothing is readable
    # (FFmpeg's tty demuxer reads any text file as an ANSI-art video: that must not pass as a video either)
    data = {"text": b"not a video\n" * 50, "garbage": np.random.default_rng(0).bytes(20_000), "empty": b""}[kind]
    path = d / {"text": "notes.txt", "garbage": "garbage.mp4", "empty": "empty.mp4"}[kind]
    path.write_bytes(data)
    return str(path)


BAD = ["missing", "directory", "text", "garbage", "empty", "image", "audio_only", "zero_frames", "header_cut"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_inputs_raise_with_path(tmp_path, kind):
    path = bad_file(kind, tmp_path)
    for call in (lambda: sample_frames(path, num_frames=4), lambda: sample_frames(path, fps=1), lambda: probe(path)):
        with pytest.raises(ValueError) as e:
            call()
        assert path in str(e.value)


def test_truncated_file_raises_with_path(tmp_path):
    # The index survives (write_video puts it first), so the header looks fine but the frames stop half way:
    # we raise rather than return a silently shorter video.
    path = truncated(tmp_path, 0.5)
    assert probe(path).num_frames == 120
    with pytest.raises(ValueError, match="truncated|corrupt") as e:
        sample_frames(path, num_frames=8)
    assert path in str(e.value)


def test_slightly_truncated_file_is_exact_or_raises(tmp_path):
    path = truncated(tmp_path, 0.995)
    try:
        v = sample_frames(path, num_frames=12)
    except ValueError as e:
        assert path in str(e)
        return
    assert len(v.indices) >= 11 and codes(v) == v.indices
    assert v.timestamps[-1] >= 119 / 25 - video.END_SLACK_S


@pytest.mark.parametrize("kwargs", [{}, {"fps": 1, "num_frames": 4}, {"num_frames": 0}, {"fps": -1},
                                    {"fps": 1, "max_frames": 0}])
def test_bad_arguments_raise_with_path(videos, kwargs):
    path = videos["fps10"][0]
    with pytest.raises(ValueError) as e:
        sample_frames(path, **kwargs)
    assert path in str(e.value)


def test_load_audio_errors_name_the_path(videos, tmp_path):
    path = videos["fps10"][0]
    with pytest.raises(ValueError, match="no audio") as e:
        load_audio(path)
    assert path in str(e.value)
    for bad in (bad_file("missing", tmp_path), bad_file("text", tmp_path)):
        with pytest.raises(ValueError) as e:
            load_audio(bad)
        assert bad in str(e.value)


def test_audio_only_file_still_loads_audio(tmp_path):
    path = write_audio_only(tmp_path / "speech.m4a", seconds=2.0)
    wav = load_audio(path)
    assert abs(len(wav) / 16000 - 2.0) < 0.1


def test_mkv_with_a_longer_audio_track_has_the_videos_length(tmp_path):
    """Matroska stores no frame count nor stream duration, but a per-stream DURATION tag: a 10 s video with 15 s of
    audio is 10 s and 100 frames (before: the container's 15 s, 151 frames, and a valid file refused as truncated)."""
    path = str(tmp_path / "long_audio.mkv")
    write_video(path, [np.full((32, 32, 3), 2 * i, np.uint8) for i in range(100)], 10,
                audio=np.zeros(15 * 16000, np.float32))
    info = probe(path)
    assert info.duration == pytest.approx(10.0) and info.num_frames == 100
    assert sample_frames(path, num_frames=8).indices == [0, 14, 28, 42, 57, 71, 85, 99]


def test_audio_that_starts_after_the_video_is_placed_on_the_videos_clock(tmp_path):
    """A click at every whole second of video time, in an audio track that starts 1 s after the video: load_audio's
    sample 0 is video time 0 (silence first), so the clicks land at 1, 2, 3 s (before: 1 s early)."""
    path, sr = str(tmp_path / "late_audio.mp4"), 16000
    clicks = np.zeros(5 * sr, np.float32)
    clicks[::sr] = 0.8  # the audio's own seconds 0..4 = video seconds 1..5
    with av.open(path, "w") as out:
        vs = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        aus = out.add_stream("aac", rate=sr, layout="mono")
        for i in range(60):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i, np.uint8), format="rgb24")))
        out.mux(vs.encode())
        for s in range(0, len(clicks), 1024):
            frame = av.AudioFrame.from_ndarray(clicks[None, s:s + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sr, sr + s, Fraction(1, sr)  # starts at 1 s
            out.mux(aus.encode(frame))
        out.mux(aus.encode())
    wave = load_audio(path, sr)
    onsets = np.flatnonzero((np.abs(wave[1:]) > 0.3) & (np.abs(wave[:-1]) <= 0.3)) / sr
    assert onsets[:4] == pytest.approx([1.0, 2.0, 3.0, 4.0], abs=0.01)
