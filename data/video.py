"""
Video I/O for long videos with PyAV: probe a file, sample frames (by count or by fps over the whole video, or by
count inside time windows) resized as they are decoded, read the audio track, and write synthetic videos (used by
the dataset generator and the tests).

    from data.video import probe, sample_frames, sample_windows, load_audio, write_video
    v = sample_frames("clip.mp4", fps=2, max_frames=768)        # or num_frames=64
    v.frames    # uint8 [T, H, W, 3], H and W multiples of 28, H*W within [min_pixels, max_pixels]
    processor(videos=[v.frames], video_metadata=[v.metadata()], do_sample_frames=False, ...)   # transformers
    llm.generate({"prompt": ..., "multi_modal_data": {"video": [(v.frames, v.metadata())]}})     # vLLM

    clips = sample_windows("film.mp4", [(0, 10), (10, 20)], num_frames=16)  # a SampledVideo per span, one pass

Long videos are the point of Long-RL, so the sampler never holds a full-size frame longer than one decode step
and, when the wanted frames are far apart, seeks to the keyframe before each one instead of decoding the whole
file. Every bad input (missing, not a video, no frames, corrupt, truncated) raises ValueError naming the path,
so a dataset can catch it and skip the sample. Only numpy and av are imported: no model code. The benchmark
of this sampler against decoding everything, torchcodec and decord is `python bench.py video`.
"""
import math
import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from tqdm import tqdm

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
class FrameSampling:
    """Which frames of a video the model sees, and at what size: the one declaration of these fields, which the
    config of every script that samples videos inherits (train_grpo.py, rollout.py, cache_embeddings.py)."""
    fps: float = 0.0                    # frame sampling rate (takes precedence over num_frames when > 0)
    num_frames: int = 64                # frames sampled uniformly over each video
    max_frames: int = 768               # cap on sampled frames (up to 8192)
    max_pixels: int = 448 * 448         # pixel budget per frame (frames are resized as they are decoded)
    min_pixels: int = 28 * 28           # smallest frame area


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
    indices: list  # frame indices into the source video (variable frame rate: nominal, time x average fps;
                   # the timestamps are the decoded frames' own)
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


def _tagged_duration(stream) -> float:
    """The stream's own duration tag in seconds (Matroska / WebM: DURATION = "00:00:10.000000000"), 0 without."""
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration") or ""
    try:
        h, m, sec = tag.split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return 0.0


def _info(container, stream, path) -> VideoInfo:
    tb = stream.time_base
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration:
        duration = float(stream.duration * tb)
    elif _tagged_duration(stream) > 0:  # mkv: the video's own length, not the container's (a longer audio track)
        duration = _tagged_duration(stream)
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


def target_indices(path, total, src_fps, fps, num_frames, max_frames):
    """Sorted unique source frame indices sample_frames decodes (path only names the file in errors); never more
    than the video has."""
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
                  size_multiple=28, progress=False) -> SampledVideo:
    """Frames of a video, resized for a Qwen-VL vision tower, sampled either
    - num_frames=N: N indices uniform over the whole video (np.linspace(0, total-1, N).round()), or
    - fps=F: one frame every src_fps/F source frames over the whole video, thinned uniformly to max_frames.
    Never returns more frames than the video has. Each frame is resized as it is decoded to fit_size(...)
    (H, W multiples of size_multiple: 28 for Qwen2.5-VL, 32 for Qwen3-VL), so memory is T*H*W*3 bytes.

    Target k is the first frame whose timestamp is >= index_k / src_fps (minus half a frame, so rounding of the
    container's time base cannot shift it); for constant-frame-rate video that is exactly frame index_k.
    A file that ends (truncated or corrupt) more than END_SLACK_S before a wanted frame raises ValueError.
    progress: a bar of the frames found (for one long video on the command line; training decodes quietly)."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        info = _info(container, stream, path)
        idx = target_indices(path, info.num_frames, info.fps, fps, num_frames, max_frames)
        try:
            h, w = fit_size(info.height, info.width, size_multiple, min_pixels, max_pixels)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        stream.thread_type = "AUTO"  # frame + slice threads: most of the time goes to the decoder
        targets = idx / info.fps
        tol = 0.5 / info.fps
        out = np.empty((len(idx), h, w, 3), np.uint8)  # the only big allocation: one resized frame per target
        stamps = np.empty(len(idx), np.float64)
        bar = tqdm(total=len(idx), desc=f"decoding {os.path.basename(path)}", unit="frame", disable=not progress)
        try:
            n, end = _decode_targets(container, stream, info.fps, targets, tol, out, stamps, bar)
        except av.error.FFmpegError as e:  # (with frame threads, FFmpeg often just stops instead: caught below)
            raise ValueError(f"{path}: corrupt video stream ({e})") from e
        finally:
            bar.close()
    if n < len(idx):
        if n == 0 or targets[-1] - end > END_SLACK_S:
            reached = "before the first frame" if end is None else f"at t={end:.2f}s"
            raise ValueError(f"{path}: truncated or corrupt: decoding stopped {reached}, but frames up to "
                             f"t={targets[-1]:.2f}s of {info.duration:.2f}s were wanted ({n}/{len(idx)} found)")
        out, stamps, idx = out[:n], stamps[:n], idx[:n]  # header overstated the length by a hair: drop the tail
    return SampledVideo(frames=out, timestamps=stamps, indices=[int(i) for i in idx], fps=info.fps,
                        total_frames=info.num_frames, duration=info.duration)


def sample_windows(path, spans, num_frames, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, size_multiple=28) -> list:
    """For each (start, end) span of one video (sorted, disjoint): num_frames frames uniform over the span, in
    one pass of the decoder, or a ValueError for a span the file cannot deliver. Each SampledVideo describes its
    clip as a video of its own (indices, frame count and duration of the window), which is what a processor
    needs to place the frames in time (Qwen2.5-VL derives seconds per frame from them). A file that cannot be
    opened or decoded at all raises ValueError, as in sample_frames."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        info = _info(container, stream, path)
        h, w = fit_size(info.height, info.width, size_multiple, min_pixels, max_pixels)
        windows = []  # (first source frame, last source frame, indices) per span
        for start, end in spans:
            first = min(math.ceil(start * info.fps - 1e-6), info.num_frames - 1)
            last = max(first, min(math.ceil(end * info.fps - 1e-6) - 1, info.num_frames - 1))
            windows.append((first, last, np.unique(np.linspace(first, last, num_frames).round().astype(np.int64))))
        idx = np.concatenate([wi[2] for wi in windows])
        targets, tol = idx / info.fps, 0.5 / info.fps
        out, stamps = np.empty((len(idx), h, w, 3), np.uint8), np.empty(len(idx), np.float64)
        stream.thread_type = "AUTO"
        try:
            n, end_t = _decode_targets(container, stream, info.fps, targets, tol, out, stamps)
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: corrupt video stream ({e})") from e
    results, j = [], 0
    for (first, last, wi), (start, end) in zip(windows, spans):
        k = min(len(wi), max(0, n - j))  # frames of this window that were decoded
        if k < len(wi) and (k == 0 or targets[j + len(wi) - 1] - (end_t or 0.0) > END_SLACK_S):
            results.append(ValueError(f"{path}: truncated or corrupt: no frames for {start:.1f}-{end:.1f}s"))
        else:
            results.append(SampledVideo(frames=out[j:j + k], timestamps=stamps[j:j + k],
                                        indices=[int(i - first) for i in wi[:k]], fps=info.fps,
                                        total_frames=int(last - first + 1), duration=end - start))
        j += len(wi)
    return results


def _decode_targets(container, stream, fps, targets, tol, out, stamps, bar=None) -> tuple:
    """Fill out[j] / stamps[j] with the first frame at or after targets[j] - tol, for sorted targets.
    Decodes forward while the next target is near and seeks when it is far; `bar` (tqdm) counts the filled ones.
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
                if bar is not None:
                    bar.update()
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
    """Mono float32 waveform of the first audio track, resampled to sr, on the video's clock: sample 0 is the
    video's first instant (an audio track that starts later is preceded by silence, one that starts earlier is
    cut), as the Omni layout puts audio token j at j / 25 s of video time. ValueError if there is no audio."""
    with _open(path) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio track")
        stream = container.streams.audio[0]
        video = container.streams.video[0] if container.streams.video else None
        video_start = float(video.start_time * video.time_base) if video is not None and video.start_time else 0.0
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks, audio_start = [], None
        try:
            for frame in container.decode(stream):
                if audio_start is None and frame.time is not None:
                    audio_start = frame.time  # seconds, the stream's first decoded sample
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush the resampler
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: corrupt audio stream ({e})") from e
    wave = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if video is None or audio_start is None:
        return wave
    shift = int(round((audio_start - video_start) * sr))  # > 0: the audio starts after the video
    return np.concatenate([np.zeros(shift, np.float32), wave]) if shift > 0 else wave[-shift:]


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
