"""
Video I/O for long videos with PyAV: probe a file, sample frames (by count or by fps) resized as they are decoded,
read the audio track, and write synthetic videos (used by the dataset generator and the tests).

    from data.video import probe, sample_frames, load_audio, write_video
    v = sample_frames("clip.mp4", fps=2, max_frames=768)        # or num_frames=64
    v.frames    # uint8 [T, H, W, 3], H and W multiples of 28, H*W within [min_pixels, max_pixels]
    processor(videos=[v.frames], video_metadata=[v.metadata()], do_sample_frames=False, ...)   # transformers
    llm.generate({"prompt": ..., "multi_modal_data": {"video": [(v.frames, v.metadata())]}})     # vLLM

    python data/video.py --bench --minutes=60 --frames=[64,512,2048]   # ours vs decode-everything, torchcodec, decord

Long videos are the point of Long-RL, so the sampler never holds a full-size frame longer than one decode step
and, when the wanted frames are far apart, seeks to the keyframe before each one instead of decoding the whole
file. Every bad input (missing, not a video, no frames, corrupt, truncated) raises ValueError naming the path,
so a dataset can catch it and skip the sample. Only numpy and av are imported: no model code.
"""
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# Default pixel budget per frame. 448*448 = 256 merged visual tokens per frame for Qwen2.5-VL (patch 14 x merge 2
# = 28 px per token side), before the temporal merge of 2 frames; the floor is 2x2 tokens so tiny videos still
# give a valid grid. Both match the shape of Qwen's smart_resize, just with a long-video-friendly max.
MAX_PIXELS = 448 * 448
MIN_PIXELS = 28 * 28 * 4
# Seek when the next wanted frame is more than this many seconds ahead (and further than the longest keyframe
# interval seen so far): below it, decoding forward is cheaper than a seek plus re-decoding from a keyframe.
SEEK_GAP_S = 2.0
# If the stream ends before the last wanted frames but within this many seconds of them, drop those frames
# quietly: headers (nb_frames, durations that include a longer audio track) are often off by a frame or two.
# Further than that, the file is truncated and we raise rather than hand the model a silently shorter video.
END_SLACK_S = 1.0


@dataclass
class VideoInfo:
    path: str
    duration: float  # seconds
    fps: float  # average frame rate
    num_frames: int
    width: int
    height: int
    has_audio: bool


@dataclass
class SampledVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3], RGB
    timestamps: np.ndarray  # float64 [T], seconds from the start of the video stream
    indices: list  # frame indices into the source video
    fps: float  # source average fps
    total_frames: int  # source frame count
    duration: float  # source duration in seconds
    audio: np.ndarray = None  # the video's audio track (mono float32, 16 kHz) when a model takes it (Omni)

    def metadata(self) -> dict:
        """What transformers' Qwen-VL processors (video_metadata=[...], do_sample_frames=False) and vLLM
        (multi_modal_data={"video": [(frames, metadata)]}) need to place the frames in time."""
        return {"total_num_frames": int(self.total_frames), "fps": float(self.fps),
                "duration": float(self.duration), "frames_indices": [int(i) for i in self.indices]}


def fit_size(height: int, width: int, size_multiple: int = 28, min_pixels: int = MIN_PIXELS,
             max_pixels: int = MAX_PIXELS) -> tuple:
    """(h, w) keeping the aspect ratio, both multiples of size_multiple, h*w within [min_pixels, max_pixels].
    Same rule as Qwen's smart_resize: round each side to the multiple, then if the area is outside the budget
    scale both by the square root of the ratio (floor when shrinking, ceil when growing)."""
    m = size_multiple
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:  # Qwen refuses these too: no grid keeps both sides sane
        raise ValueError(f"aspect ratio of {height}x{width} is over 200")
    if min_pixels > max_pixels or max_pixels < m * m:
        raise ValueError(f"bad pixel budget [{min_pixels}, {max_pixels}] for size_multiple {m}")
    h, w = max(m, round(height / m) * m), max(m, round(width / m) * m)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(m, math.floor(height / beta / m) * m), max(m, math.floor(width / beta / m) * m)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / m) * m, math.ceil(width * beta / m) * m
    return h, w


# ----------------------------------------------------------------------------------------------------------------
# opening and probing


def _open(path):
    """av.open with every failure turned into a ValueError that names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        return av.open(path)
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: not a readable video ({e})") from e


# FFmpeg opens a few things that are not videos as video streams: any text file as ANSI art (tty and friends)
# and still images (image2, png_pipe, jpeg_pipe, ...). A dataset pointing at those is a bug, not a 1-frame video.
NOT_VIDEO_FORMATS = {"tty", "bin", "xbin", "adf", "idf", "image2"}


def _video_stream(container, path):
    name = container.format.name
    if name in NOT_VIDEO_FORMATS or name.endswith("_pipe"):
        raise ValueError(f"{path}: not a video (FFmpeg reads it as {container.format.long_name})")
    # Cover art in audio files (mp3/m4a) shows up as a one-frame video stream marked attached_pic: not a video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise ValueError(f"{path}: no video stream (format {container.format.name})")
    return streams[0]


def _info(container, stream, path) -> VideoInfo:
    tb = stream.time_base
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration:
        duration = float(stream.duration * tb)
    elif container.duration:  # container duration can include a longer audio track; END_SLACK_S absorbs it
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    num_frames = stream.frames
    if not num_frames and fps > 0:
        # Some containers (mkv, webm, ts) do not store a frame count: estimate it from duration * fps. An
        # overestimate is absorbed when decoding (END_SLACK_S); the sampler never asks for more than this.
        num_frames = int(round(duration * fps))
    if fps <= 0 and num_frames > 0 and duration > 0:
        fps = num_frames / duration
    if num_frames <= 0 or fps <= 0:
        raise ValueError(f"{path}: video stream has no frames")
    if not duration:
        duration = num_frames / fps
    return VideoInfo(path=os.fspath(path), duration=duration, fps=fps, num_frames=int(num_frames),
                     width=stream.codec_context.width, height=stream.codec_context.height,
                     has_audio=len(container.streams.audio) > 0)


def probe(path) -> VideoInfo:
    """Duration, fps, frame count, size and whether there is audio, from the headers (nothing is decoded).
    Raises ValueError for anything sample_frames would reject up front, so it can be used to filter datasets."""
    with _open(path) as container:
        return _info(container, _video_stream(container, path), path)


# ----------------------------------------------------------------------------------------------------------------
# frame sampling


def _target_indices(path, total, src_fps, fps, num_frames, max_frames):
    """Sorted unique source frame indices to sample; never more than the video has."""
    if (fps is None) == (num_frames is None):
        raise ValueError(f"{path}: give exactly one of fps and num_frames (got fps={fps}, num_frames={num_frames})")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"{path}: num_frames must be >= 1, got {num_frames}")
        # uniform over the whole video, first and last frame included; when num_frames > total the rounding
        # makes duplicates, and dropping them leaves every frame once
        return np.unique(np.linspace(0, total - 1, num_frames).round().astype(np.int64))
    if fps <= 0:
        raise ValueError(f"{path}: fps must be > 0, got {fps}")
    if max_frames < 1:
        raise ValueError(f"{path}: max_frames must be >= 1, got {max_frames}")
    step = max(src_fps / fps, 1.0)  # asking for more than the source rate gives every frame, not duplicates
    count = math.ceil(total / step - 1e-9)
    # floor: the frame on screen at time k/fps; the epsilon keeps 2.9999999 from becoming 2
    idx = np.unique(np.minimum(np.floor(np.arange(count) * step + 1e-6).astype(np.int64), total - 1))
    if len(idx) > max_frames:  # thin uniformly, keeping the first and last
        idx = idx[np.unique(np.linspace(0, len(idx) - 1, max_frames).round().astype(np.int64))]
    return idx


def _decoded(container, stream, fps):
    """(time in seconds from the stream start, frame) for each decoded frame, in presentation order."""
    tb, start = float(stream.time_base), stream.start_time or 0
    t = None
    for frame in container.decode(stream):
        # pts is missing in a few broken files: assume the nominal frame rate then
        t = (frame.pts - start) * tb if frame.pts is not None else (t + 1 / fps if t is not None else 0.0)
        yield t, frame


def sample_frames(path, fps=None, num_frames=None, max_frames=768, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS,
                  size_multiple=28) -> SampledVideo:
    """Frames of a video, resized for a Qwen-VL vision tower, sampled either
    - num_frames=N: N indices uniform over the whole video (np.linspace(0, total-1, N).round()), or
    - fps=F: one frame every src_fps/F source frames over the whole video, thinned uniformly to max_frames.
    Never returns more frames than the video has. Each frame is resized as it is decoded to fit_size(...)
    (H, W multiples of size_multiple: 28 for Qwen2.5-VL, 32 for Qwen3-VL), so memory is T*H*W*3 bytes.

    Target k is the first frame whose timestamp is >= index_k / src_fps (minus half a frame, so rounding of the
    container's time base cannot shift it); for constant-frame-rate video that is exactly frame index_k.
    A file that ends (truncated or corrupt) more than END_SLACK_S before a wanted frame raises ValueError."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        info = _info(container, stream, path)
        idx = _target_indices(path, info.num_frames, info.fps, fps, num_frames, max_frames)
        try:
            h, w = fit_size(info.height, info.width, size_multiple, min_pixels, max_pixels)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        stream.thread_type = "AUTO"  # frame + slice threads: most of the time goes to the decoder
        targets = idx / info.fps
        tol = 0.5 / info.fps
        out = np.empty((len(idx), h, w, 3), np.uint8)  # the only big allocation: one resized frame per target
        stamps = np.empty(len(idx), np.float64)
        try:
            n, end = _decode_targets(container, stream, info.fps, targets, tol, out, stamps)
        except av.error.FFmpegError as e:  # (with frame threads, FFmpeg often just stops instead: caught below)
            raise ValueError(f"{path}: corrupt video stream ({e})") from e
    if n < len(idx):
        if n == 0 or targets[-1] - end > END_SLACK_S:
            reached = "before the first frame" if end is None else f"at t={end:.2f}s"
            raise ValueError(f"{path}: truncated or corrupt: decoding stopped {reached}, but frames up to "
                             f"t={targets[-1]:.2f}s of {info.duration:.2f}s were wanted ({n}/{len(idx)} found)")
        out, stamps, idx = out[:n], stamps[:n], idx[:n]  # header overstated the length by a hair: drop the tail
    return SampledVideo(frames=out, timestamps=stamps, indices=[int(i) for i in idx], fps=info.fps,
                        total_frames=info.num_frames, duration=info.duration)


def _decode_targets(container, stream, fps, targets, tol, out, stamps) -> tuple:
    """Fill out[j] / stamps[j] with the first frame at or after targets[j] - tol, for sorted targets.
    Decodes forward while the next target is near and seeks when it is far.
    Returns (how many were filled, time of the last frame decoded or None)."""
    h, w = out.shape[1:3]
    # One reformatter for the whole video: it caches the swscale context, which frame.to_ndarray(width=...)
    # would rebuild (with a thread pool) for every frame: 20 us instead of 0.8 ms for a small frame. One thread,
    # because the decoder already has the cores and data-loader workers run side by side.
    resize = VideoReformatter()
    frames = _decoded(container, stream, fps)  # no seek for the start: we are already there
    pos = 0.0  # time of the last decoded frame (where the decoder is)
    end = None  # the same, but None until a frame is actually decoded
    gop = 0.0  # lower bound on the keyframe interval, learned as we go
    last_key = None
    j = 0
    while j < len(targets):
        if targets[j] - pos > max(SEEK_GAP_S, 1.5 * gop):
            # A seek lands on the last keyframe before the target. It only pays if that keyframe is past where
            # we are; a gap clearly wider than any keyframe interval seen so far makes that likely. (1.5x: the
            # gaps between uniform targets wobble by a frame, and a gap just over one interval saves little.)
            frames, seek_t, first_t = _seek(container, stream, fps, targets[j], tol)
            if first_t is not None:
                gop = max(gop, seek_t - first_t)  # no keyframe between where we landed and where we asked
            last_key = None
        for t, frame in frames:
            pos = end = t
            if frame.key_frame:
                if last_key is not None:
                    gop = max(gop, t - last_key)
                last_key = t
            if t < targets[j] - tol:
                continue  # decoded only to get to the next wanted frame; never converted
            # one conversion, straight to the small RGB size; the full-size frame is dropped with `frame`
            rgb = resize.reformat(frame, width=w, height=h, format="rgb24", threads=1).to_ndarray()
            while j < len(targets) and t >= targets[j] - tol:  # (one frame can serve several in a VFR gap)
                out[j], stamps[j] = rgb, t
                j += 1
            break
        else:
            break  # end of stream
    return j, end


def _seek(container, stream, fps, target, tol):
    """Seek so that decoding starts at or before target; returns (frames iterator, seek time, first frame time).
    A demuxer that seeks by decode timestamp can, with B-frames, land on a keyframe shown after the target
    (FFmpeg's mp4 demuxer corrects for this; not every demuxer does): then seek again further back
    (1 s, 2 s, 4 s ...) until the first decoded frame is not past the target."""
    tb, start = stream.time_base, stream.start_time or 0
    back = 0.0
    while True:
        seek_t = max(target - tol - back, 0.0)
        container.seek(start + int(seek_t / tb), stream=stream, backward=True)
        frames = _decoded(container, stream, fps)
        first = next(frames, None)
        if first is None and seek_t == 0:
            return iter(()), seek_t, None
        if first is not None and (first[0] <= target + tol or seek_t == 0):
            return _chain(first, frames), seek_t, first[0]
        back = max(1.0, 2 * back)


def _chain(first, rest):
    yield first
    yield from rest


# ----------------------------------------------------------------------------------------------------------------
# audio


def load_audio(path, sr=16000) -> np.ndarray:
    """Mono float32 waveform of the first audio track, resampled to sr. ValueError if there is none."""
    with _open(path) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio track")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush the resampler
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: corrupt audio stream ({e})") from e
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


# ----------------------------------------------------------------------------------------------------------------
# writing


def _video_codec():
    """libx264 when this PyAV build has it (it does in the PyPI wheels), else mpeg4, which every build has."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path, frames, fps, audio=None, sample_rate=16000, crf=23, gop=250, preset="veryfast", codec=None,
                threads: int = 1):
    """Write an mp4 (h264/yuv420p, aac audio) from an iterable of uint8 [H, W, 3] RGB frames, streamed: frames
    are encoded as they come, so a generator can produce an hour of video in constant memory.

    fps: int, float or Fraction (pass Fraction(30000, 1001) for NTSC; floats are snapped to a denominator <= 1001).
    audio: optional mono float waveform in [-1, 1] at sample_rate, written interleaved with the video.
    crf: quality for libx264 (lower is better); the mpeg4 fallback uses qscale ~ crf/8 instead.
    gop: keyframe interval in frames (exact: no extra keyframes at scene cuts); it bounds the cost of a seek.
    codec: None picks libx264 if this PyAV build has it, else mpeg4; or name one of the two.
    threads: for the RGB -> YUV conversion and the encoder; 1 (the default) for repeatable output, 0 lets FFmpeg
    pick (faster for big frames). Measured here with PyAV 18.1 on a loaded 2-core machine: with FFmpeg's own
    threading, 6 of 20 encodes of the same 64 frames decoded to different pixels; with 1 thread, 0 of 100 (but the
    synthetic-data test still saw one small difference in ~30 runs under heavier load: tests/test_data.py).
    Odd sizes: yuv420p (the only chroma layout every decoder plays) needs even width and height, so odd frames
    are padded by repeating the last row/column; probe() then reports the padded, even size."""
    rate = Fraction(fps).limit_denominator(1001)
    codec = codec or _video_codec()
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    first = np.asarray(first)
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"{path}: frames must be uint8 [H, W, 3], got {first.dtype} {first.shape}")
    height, width = first.shape[:2]
    pad_h, pad_w = height % 2, width % 2
    if audio is not None:
        audio = np.asarray(audio, np.float32).reshape(-1)
    # faststart puts the index (moov) first: players can stream the file, and a truncated copy stays readable
    # up to the cut instead of losing the index that mp4 otherwise writes at the very end
    with av.open(os.fspath(path), "w", options={"movflags": "faststart"}) as container:
        vs = container.add_stream(codec, rate=rate)
        vs.width, vs.height, vs.pix_fmt = width + pad_w, height + pad_h, "yuv420p"
        vs.codec_context.gop_size = gop
        vs.codec_context.thread_count = threads
        if codec == "libx264":
            # scenecut=0: keyframes exactly every `gop` frames, not also wherever the content jumps (the frame
            # codes of the tests jump a lot), so seek costs are predictable
            vs.options = {"crf": str(crf), "preset": preset, "x264-params": "scenecut=0"}
        else:  # constant quantizer; FF_QP2LAMBDA = 118 turns a qscale (2 best .. 31) into global_quality
            vs.codec_context.qscale = True
            vs.codec_context.global_quality = 118 * min(31, max(2, round(crf / 8)))
        if audio is not None:
            aus = container.add_stream("aac", rate=sample_rate, layout="mono")
        written = 0  # audio samples written so far
        to_yuv = VideoReformatter()  # one swscale context for the whole video (see _decode_targets)
        for i, frame in enumerate(_chain(first, it)):
            frame = np.asarray(frame)
            if frame.shape != first.shape or frame.dtype != np.uint8:
                raise ValueError(f"{path}: frame {i} is {frame.dtype} {frame.shape}, expected uint8 {first.shape}")
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            vf = to_yuv.reformat(av.VideoFrame.from_ndarray(frame, format="rgb24"), format="yuv420p", threads=threads)
            vf.pts, vf.time_base = i, 1 / rate
            container.mux(vs.encode(vf))
            if audio is not None:  # keep audio in step with the video, so the muxer interleaves without buffering
                upto = min(len(audio), round((i + 1) / rate * sample_rate))
                written = _write_audio(container, aus, audio, written, upto, sample_rate)
        container.mux(vs.encode())  # flush the encoder's delayed frames
        if audio is not None:
            _write_audio(container, aus, audio, written, len(audio), sample_rate)
            container.mux(aus.encode())


def _write_audio(container, stream, audio, start, stop, sample_rate):
    if stop > start:
        af = av.AudioFrame.from_ndarray(audio[None, start:stop], format="fltp", layout="mono")
        af.sample_rate, af.pts, af.time_base = sample_rate, start, Fraction(1, sample_rate)
        container.mux(stream.encode(af))  # PyAV re-chunks to the encoder's 1024-sample frames
    return max(start, stop)


# ----------------------------------------------------------------------------------------------------------------
# benchmark: python data/video.py --bench


@dataclass
class BenchConfig:
    bench: bool = False  # run the benchmark (the only thing this script does)
    minutes: float = 60.0  # length of the synthetic video
    frames: list = field(default_factory=lambda: [64, 512, 2048])  # num_frames values to measure
    size: int = 64  # the synthetic video is size x size pixels
    video_fps: int = 25  # frame rate of the synthetic video
    gop: int = 250  # keyframe interval of the synthetic video, in frames
    cache_dir: str = ""  # where the synthetic video is kept between runs ('' = <tmp>/longrl_video_bench)
    repeats: int = 3  # runs per measurement; the table shows the fastest (the least disturbed by other load)
    naive_minutes: float = 0.0  # decode-everything only over the first this many minutes and extrapolate (0 = all)
    others: list = field(default_factory=lambda: ["torchcodec", "torchcodec_approx", "decord"])  # [] = PyAV only


def _bench_naive(path, num_frames, limit=0, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, size_multiple=28):
    """The baseline: decode every frame in order (only the first `limit` if > 0), convert the wanted ones. Same
    indices and resize as sample_frames, so the two must return identical arrays."""
    info = probe(path)
    want = set(_target_indices(path, info.num_frames, info.fps, None, num_frames, 0).tolist())
    h, w = fit_size(info.height, info.width, size_multiple, min_pixels, max_pixels)
    out = np.empty((len(want), h, w, 3), np.uint8)
    resize = VideoReformatter()  # the same conversion as sample_frames, so only the decoding differs
    j = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if limit and i >= limit:
                break
            if i in want:
                out[j] = resize.reformat(frame, width=w, height=h, format="rgb24", threads=1).to_ndarray()
                j += 1
    return out[:j]


def _bench_other(lib, path, num_frames):
    """The same indices and output (uint8 [T, H, W, 3] at fit_size) through torchcodec or decord, each resizing
    inside its own decoder with FFmpeg's automatic thread count, like sample_frames. Bench only: never imported
    by anything else, and neither library is a dependency."""
    info = probe(path)
    idx = _target_indices(path, info.num_frames, info.fps, None, num_frames, 0).tolist()
    h, w = fit_size(info.height, info.width)
    if lib.startswith("torchcodec"):
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize  # bilinear, antialiased
        dec = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=0, transforms=[Resize((h, w))],
                           seek_mode="approximate" if lib.endswith("approx") else "exact")
        return dec.get_frames_at(idx).data.numpy()
    import decord
    return decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=0).get_batch(idx).asnumpy()


# Run in a fresh interpreter per measurement so the peak RSS is this one's alone. The peak is VmHWM, this
# process's own high-water mark: ru_maxrss would also count the parent's RSS, which Linux carries over the exec of
# a vforked child (600 MB under `python bench.py video`, which has torch loaded).
# n = 0 only imports: the memory floor of that row's libraries. Imports are not timed.
_BENCH_WORKER = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from data.video import sample_frames, _bench_naive, _bench_other
mode, path, n, limit, save = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
if mode.startswith("torchcodec"):
    from torchcodec.decoders import VideoDecoder
elif mode == "decord":
    import decord
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system, all threads
def peak_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:  # not Linux: ru_maxrss (KB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
t0, c0 = time.perf_counter(), cpu()
frames = np.zeros((0, 1, 1, 3), np.uint8)
if n and mode == "seek":
    frames = sample_frames(path, num_frames=n).frames
elif n and mode == "naive":
    frames = _bench_naive(path, n, limit)
elif n:
    frames = _bench_other(mode, path, n)
dt, dc, peak = time.perf_counter() - t0, cpu() - c0, peak_mb()
if save != "-":
    np.save(save, frames)
print(json.dumps({"seconds": dt, "cpu_s": dc, "max_rss_mb": peak, "frames": len(frames)}))
"""


def _bench_video(cfg):
    """The long synthetic video, generated once: a noise texture sliding sideways (so the encoder has real work,
    and a frame off by one differs from the right one everywhere)."""
    import tempfile
    folder = cfg.cache_dir or os.path.join(tempfile.gettempdir(), "longrl_video_bench")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"bench_{cfg.minutes:g}min_{cfg.size}px_{cfg.video_fps}fps_gop{cfg.gop}.mp4")
    if not os.path.exists(path):
        n = int(cfg.minutes * 60 * cfg.video_fps)
        texture = np.random.default_rng(0).integers(0, 256, (cfg.size, cfg.size * 4, 3), dtype=np.uint8)
        frames = (np.roll(texture, -i, axis=1)[:, :cfg.size] for i in range(n))
        print(f"writing {n} frames to {path} (once) ...", flush=True)
        write_video(path + ".part.mp4", frames, cfg.video_fps, gop=cfg.gop, threads=0)  # speed over repeatable bytes
        os.replace(path + ".part.mp4", path)
    return folder, path


def _other_env(lib, folder, path):
    """(environment for its children, "name version", how it loads) if `lib` decodes `path` in a child process,
    else (None, name, why not). torchcodec's wheel carries no FFmpeg: it loads the system's libavutil.so.N and
    friends on first use. Where there are none, PyAV's wheel carries an FFmpeg under renamed files; symlinks with
    the plain names on the child's LD_LIBRARY_PATH let torchcodec load those if their major versions are ones it
    was built for (bench only: nothing is installed or changed outside the cache folder)."""
    import re
    import subprocess
    import sys
    module = lib.split("_")[0]
    dist = next((d for d in [module, "eva-" + module] if _dist_version(d)), None)
    if dist is None:
        return None, lib, "not installed"
    name = f"{dist} {_dist_version(dist)}"
    check = (f"from torchcodec.decoders import VideoDecoder; VideoDecoder({path!r}, seek_mode='approximate')"
             if module == "torchcodec" else f"import decord; decord.VideoReader({path!r})")
    run = lambda env: subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    r = run(None)
    if r.returncode == 0:
        return dict(os.environ), name, "loads as installed"
    why = f"installed but fails: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}"
    libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    if module != "torchcodec" or not os.path.isdir(libs):
        return None, name, why
    shim = os.path.join(folder, f"pyav{av.__version__}_ffmpeg")
    os.makedirs(shim, exist_ok=True)
    for f in os.listdir(libs):
        m = re.match(r"(lib(?:av|sw)\w+)-[0-9a-f]+\.so\.(\d+)", f)
        if m and not os.path.lexists(os.path.join(shim, f"{m[1]}.so.{m[2]}")):
            os.symlink(os.path.join(libs, f), os.path.join(shim, f"{m[1]}.so.{m[2]}"))
    paths = [shim, libs] + ([os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else [])
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}
    if run(env).returncode == 0:
        return env, name, (f"no FFmpeg libraries on this system; runs on the FFmpeg bundled in PyAV's wheel "
                           f"(libavutil {'.'.join(map(str, av.library_versions['libavutil']))}) through {shim}")
    return None, name, why + " (PyAV's bundled FFmpeg did not help either)"


def _dist_version(name):
    import importlib.metadata as md
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def bench(cfg):
    import json
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t = time.perf_counter()
    folder, path = _bench_video(cfg)
    info = probe(path)
    limit = round(cfg.naive_minutes * 60 * info.fps) if 0 < cfg.naive_minutes < info.duration / 60 else 0
    scale = info.num_frames / limit if limit else 1.0  # decode-everything time x this = the whole video's
    h, w = fit_size(info.height, info.width)
    print(f"{path}: {info.num_frames} frames, {info.duration / 60:.1f} min, {info.width}x{info.height}, "
          f"{info.fps:g} fps, gop {cfg.gop}; every method returns uint8 [T, {h}, {w}, 3]")
    envs = {"seek": (dict(os.environ), "ours", ""), "naive": (dict(os.environ), f"PyAV {av.__version__}", "")}
    envs.update({lib: _other_env(lib, folder, path) for lib in cfg.others})
    for lib in cfg.others:
        print(f"{lib}: {envs[lib][1]}: {envs[lib][2]}")

    def measure(mode, n, save="-"):
        r = subprocess.run([sys.executable, "-c", _BENCH_WORKER, root, mode, path, str(n),
                            str(limit if mode == "naive" else 0), save], env=envs[mode][0], capture_output=True,
                           text=True)
        if r.returncode:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
        return json.loads(r.stdout.strip().splitlines()[-1])

    label = {"seek": "ours: seek-based sample_frames",
             "naive": "decode every frame (PyAV)" + f", first {cfg.naive_minutes:g} min, extrapolated" * bool(limit)}
    for lib in cfg.others:  # "name version" (or the name asked for, when not installed) and the seek mode
        label[lib] = envs[lib][1] + {"torchcodec": ", seek_mode=exact",
                                     "torchcodec_approx": ", seek_mode=approximate"}.get(lib, "")
    floors = {mode: measure(mode, 0, "-").get("max_rss_mb") for mode in envs if envs[mode][0] is not None}
    with av.open(path) as container:  # how far apart two adjacent frames are (what a frame off by one would score)
        pair = [VideoReformatter().reformat(f, width=w, height=h, format="rgb24").to_ndarray().astype(np.int16)
                for _, f in zip(range(2), container.decode(video=0))]
    adjacent = float(np.abs(pair[0] - pair[1]).mean())
    rows, load = [], [os.getloadavg()[0]]
    for n in cfg.frames:
        got, block, runs = {}, [], {mode: [] for mode in envs if envs[mode][0] is not None}
        for k in range(cfg.repeats):  # round robin, so that a slow spell of this machine hits every method alike
            for mode in runs:
                save = os.path.join(folder, f"frames_{mode}.npy") if k == 0 else "-"
                runs[mode].append(measure(mode, n, save))
                if save != "-" and "error" not in runs[mode][-1]:
                    got[mode] = np.load(save)
                    os.remove(save)
        for mode in envs:
            row = {"num_frames": n, "method": mode, "library": envs[mode][1]}
            block.append(row)
            if envs[mode][0] is None or "error" in runs[mode][0]:
                row["error"] = envs[mode][2] if envs[mode][0] is None else runs[mode][0]["error"]
                continue
            m = {**min(runs[mode], key=lambda run: run.get("seconds", 1e9)),  # the fastest run; peak: the worst
                 "max_rss_mb": max(run.get("max_rss_mb", 0) for run in runs[mode])}
            x = scale if mode == "naive" else 1.0
            row.update(frames=m["frames"], wall_s=m["seconds"] * x, cpu_s=m["cpu_s"] * x,
                       frames_per_s=n / (m["seconds"] * x), peak_rss_mb=m["max_rss_mb"],
                       over_floor_mb=m["max_rss_mb"] - floors[mode], extrapolated=x != 1.0)
            ours = got.get("seek")
            if ours is not None and mode != "seek":  # same frames? identical, or how far each frame is from ours
                a, b = ours[:len(got[mode])].astype(np.int16), got[mode].astype(np.int16)
                row["identical"] = a.shape == b.shape and bool((a == b).all())
                if a.shape == b.shape:
                    row["max_frame_mad"] = float(np.abs(a - b).mean(axis=(1, 2, 3)).max())
        naive = block[1].get("wall_s")
        for row in block:
            if naive and "wall_s" in row:
                row["vs_decode_all"] = naive / row["wall_s"]
        rows += block
    load.append(os.getloadavg()[0])
    print(f"wall/cpu: best of {cfg.repeats} fresh processes, methods taken in turn (cpu = user+system, all threads; "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after); peak RSS: the worst of them; floor = RSS after "
          f"imports only: " + ", ".join(f"{k} {v:.0f} MB" for k, v in floors.items()))
    print(f"{'frames':>6}  {'method':<58} {'wall s':>7} {'cpu s':>7} {'frames/s':>8} {'x':>5} {'peak MB':>7} "
          f"{'+floor':>6}  same frames as ours?")
    for r in rows:
        if "wall_s" not in r:
            print(f"{r['num_frames']:>6}  {label[r['method']]:<58} {r['error']}")
            continue
        same = ("identical" if r.get("identical") else f"max frame MAD {r['max_frame_mad']:.1f}/255"
                if "max_frame_mad" in r else "-") + f" ({r['frames']} frames in the prefix)" * r["extrapolated"]
        print(f"{r['num_frames']:>6}  {label[r['method']]:<58} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} "
              f"{r['frames_per_s']:>8.0f} {r.get('vs_decode_all', float('nan')):>4.1f}x {r['peak_rss_mb']:>7.0f} "
              f"{r['over_floor_mb']:>6.0f}  {same if r['method'] != 'seek' else '(reference)'}")
    print("every row: open + probe + decode + resize to the same size, frames returned as numpy, in its own process; "
          "x = decode-everything time / this row's; MAD = mean |difference| of a frame vs ours (resizers differ: "
          "PyAV swscale bilinear, torchcodec bilinear antialiased, decord its own), against a frame off by one: "
          f"{adjacent:.0f}; whole run {time.perf_counter() - t:.0f} s")
    print("BENCH " + json.dumps({"bench": "video", "video": {"minutes": cfg.minutes, "frames": info.num_frames,
                                 "size": cfg.size, "fps": cfg.video_fps, "gop": cfg.gop}, "out_hw": [h, w],
                                 "naive_prefix_frames": limit, "floor_rss_mb": floors, "adjacent_frame_mad": adjacent,
                                 "cpus": os.cpu_count(), "load_avg": load,
                                 "libraries": {k: v[1:] for k, v in envs.items()}, "rows": rows}, default=float))


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    from configurator import parse_config
    cfg = parse_config(BenchConfig)
    if not cfg.bench:
        print("nothing to do: this script only runs the benchmark (--bench); see --help")
        sys.exit(1)
    bench(cfg)
