"""
A local web demo for any checkpoint the project loads (a merged training run, a Qwen2.5-VL / Qwen3-VL / Omni /
LLaVA / VILA folder, the CPU demo's tiny model): upload a video or pick an example, ask, and read the answer as
it is generated, beside the frames the model saw (with their timestamps), the number of video tokens and the
seconds each stage took.

    pip install gradio                              # optional: only this demo needs it
    python web_demo.py --model=PATH                 # then open http://127.0.0.1:7860
    python web_demo.py --model=PATH --examples=DIR  # DIR's .mp4 files offered as examples
    python web_demo.py --model=PATH --engine=vllm   # GPU node with vllm installed: the answer comes whole

The HF engine (any machine) streams the answer token by token; vLLM's offline engine returns it whole. Frames are
chosen by count or by rate (up to 8,192, as the CLI: rollout.py --num_frames / --fps). A video that cannot be read
gets a message in the page naming the file; the server keeps serving.
"""
import dataclasses
import glob
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

from configurator import parse_config
from rollout import InferenceConfig, hf_generate, load_for_inference, prompt_embeddings
from vlm import build_prompt, eos_ids, family, load_video

MAX_FRAMES = 8192   # the longest sampling the project runs (README: an hour-long video at 8,192 frames)
STRIP = 12          # frames shown under the answer, evenly spaced over the sampled ones


@dataclass
class WebConfig(InferenceConfig):  # model, engine, sampling, device, frame sampling: rollout.py; here the page's
    examples: str = ""              # a folder whose .mp4 files the page offers as examples
    host: str = "127.0.0.1"         # where the server listens (0.0.0.0 to reach it from other machines)
    port: int = 7860                # 0: any free port (printed)
    max_new_tokens: int = 512       # the page's starting value for the answer's length cap


def frame_strip(video, count: int = STRIP) -> list:
    """(image, caption) pairs for the page: `count` of the sampled frames, evenly spaced, captioned with their
    time in the video."""
    picks = sorted({round(i * (len(video.frames) - 1) / max(count - 1, 1)) for i in range(count)})
    return [(video.frames[i], f"{video.timestamps[i]:.1f} s") for i in picks]


def stream_hf(model, processor, prompt, max_new_tokens: int, temperature: float, seed: int):
    """Yield the answer so far after every new token: hf_generate runs in a thread and hands each sampled token
    over a queue (on_token); tokens after a stop token (a GPU run checks for the stop every 8) are dropped."""
    tokens, ids, stop = queue.Queue(), [], set(eos_ids(model, processor))

    def generate():
        try:
            hf_generate(model, processor, [prompt], n=1, temperature=temperature, max_new_tokens=max_new_tokens,
                        seed=seed, on_token=lambda row: tokens.put(row[0]))
            tokens.put(None)
        except Exception as e:  # noqa: BLE001 (handed to the page's handler, which shows it)
            tokens.put(e)

    threading.Thread(target=generate, daemon=True).start()
    stopped = False
    while (token := tokens.get()) is not None:
        if isinstance(token, Exception):
            raise token
        stopped = stopped or token in stop
        if not stopped:
            ids.append(token)
            yield processor.tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def frame_sampling(cfg: WebConfig, frames_by: str, frames, vllm: bool) -> WebConfig:
    """cfg with the frame sampling the page asks for: a count of 1-8,192 frames, or a rate above 0 and up to 60
    fps. Anything else is a ValueError saying so (a count of 0.5 would pass `0 < frames`, then sample int(0.5) =
    0 frames)."""
    try:
        frames = float(frames)
    except (TypeError, ValueError):
        raise ValueError(f"frames {frames!r}: give a number") from None
    if frames_by == "count" and not 1 <= frames <= MAX_FRAMES:  # (NaN fails every comparison)
        raise ValueError(f"frames {frames:g}: give 1-{MAX_FRAMES} frames")
    if frames_by != "count" and not 0 < frames <= 60:
        raise ValueError(f"frames {frames:g}: give a rate above 0 and up to 60 fps")
    return dataclasses.replace(cfg, num_frames=int(frames) if frames_by == "count" else 0,
                               fps=frames if frames_by == "fps" else 0.0,
                               max_frames=cfg.max_frames if vllm else MAX_FRAMES)  # vLLM: its own cap


def answer(model, processor, engine, cfg: WebConfig, video_path, question: str, frames_by: str, frames: float,
           think: bool, max_new_tokens: int, temperature: float):
    """The page's one action, a generator of (answer, frame strip, status) that the page shows as they come.
    Every failure (no video, a file that does not decode, a bad setting) ends in a status message, never an
    exception: the server keeps serving."""
    if not video_path:
        yield "", [], "Upload a video or pick an example first."
        return
    if not question or not question.strip():
        yield "", [], "Ask a question about the video."
        return
    name = os.path.basename(str(video_path))
    try:
        sampling = frame_sampling(cfg, frames_by, frames, engine is not None)
    except ValueError as e:  # a setting, not the video: said as such
        yield "", [], str(e)
        return
    try:
        t0 = time.time()
        video = load_video(str(video_path), sampling, family(model))
        t1 = time.time()
        prompt = build_prompt(model, processor, question.strip(), video, think)
        t2 = time.time()
    except Exception as e:  # noqa: BLE001 (an unreadable upload is the user's input, reported in the page)
        yield "", [], f"Could not read the video {name}: {e}"
        return
    seen = (f"{len(video.frames)} frames of {video.frames.shape[2]}x{video.frames.shape[1]} -> "
            f"{prompt.num_video_tokens} video tokens (prompt {len(prompt.input_ids)} tokens); "
            f"decode {t1 - t0:.2f} s, processor {t2 - t1:.2f} s")
    strip = frame_strip(video)
    yield "", strip, seen + "; answering..."
    text, count = "", 0
    try:
        if engine is None:
            for text, count in stream_hf(model, processor, prompt, int(max_new_tokens), float(temperature), cfg.seed):
                yield text, strip, seen + "; answering..."
        else:
            embeds = prompt_embeddings(model, [prompt]) if engine.prompt_embeds else None
            out = engine.generate([prompt], n=1, temperature=float(temperature), top_p=cfg.top_p,
                                  max_new_tokens=int(max_new_tokens), seed=cfg.seed, embeds=embeds)[0]
            text, count = out.text, len(out.response_ids)
    except Exception as e:  # noqa: BLE001
        yield text, strip, f"{seen}; generation failed: {e}"
        return
    yield text, strip, f"{seen}; answer {time.time() - t2:.2f} s ({count} tokens, vision tower and prompt pass in it)"


def build_page(model, processor, engine, cfg: WebConfig):
    import gradio as gr  # optional dependency: main() says how to install it
    examples = sorted(glob.glob(os.path.join(cfg.examples, "*.mp4"))) if cfg.examples else []
    with gr.Blocks(title="Long-RL video demo", analytics_enabled=False) as page:  # local: no usage reports
        gr.Markdown(f"### Ask about a video\nModel `{cfg.model}` ({family(model)}), engine "
                    f"{'vLLM' if engine else 'HF (streamed)'}")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="video", sources=["upload"], elem_id="video")
                question = gr.Textbox(label="question", elem_id="question")
                with gr.Row():
                    frames_by = gr.Radio(["count", "fps"], value="fps" if cfg.fps else "count", label="frames by")
                    frames = gr.Number(value=cfg.fps or cfg.num_frames, label="frames (count, up to 8,192) or fps",
                                       elem_id="frames")
                think = gr.Checkbox(value=cfg.think, label="thinking (<think> ... </think> before the answer)")
                max_new = gr.Slider(1, 4096, value=cfg.max_new_tokens, step=1, label="max new tokens")
                temperature = gr.Slider(0, 1.5, value=cfg.temperature, step=0.05, label="temperature (0: greedy)")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                if examples:
                    gr.Examples(examples, inputs=[video], label="examples")
            with gr.Column():
                reply = gr.Textbox(label="answer", lines=8, elem_id="answer")
                status = gr.Textbox(label="what ran", lines=2, elem_id="status")
                strip = gr.Gallery(label="frames the model saw", columns=6, height="auto", elem_id="strip")
        ask.click(lambda *a: (yield from answer(model, processor, engine, cfg, *a)),
                  [video, question, frames_by, frames, think, max_new, temperature], [reply, strip, status])
    return page


def main(cfg: WebConfig):
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("the web demo needs Gradio: pip install gradio (an optional dependency of this project)")
    if not cfg.model:
        raise SystemExit("give --model=PATH (a checkpoint folder; see --help)")
    model, processor, engine = load_for_inference(cfg)
    page = build_page(model, processor, engine, cfg)
    page.queue(default_concurrency_limit=1)  # one answer at a time: the model is not shared between requests
    port = cfg.port
    if not port:  # any free port: ask the OS for one
        with socket.socket() as s:
            s.bind((cfg.host, 0))
            port = s.getsockname()[1]
    print(f"web demo on http://{cfg.host}:{port}", flush=True)
    page.launch(server_name=cfg.host, server_port=port, show_error=True)


if __name__ == "__main__":
    main(parse_config(WebConfig))
