"""
Sampling answers: two rollout engines, evaluation and an inference CLI (the model itself lives in vlm.py).

    python rollout.py --model=PATH --video=clip.mp4 --question="What happens?" --num_frames=64
    python rollout.py --model=PATH --eval=eval.jsonl --num_frames=64          # accuracy per category
    python rollout.py --model=PATH --eval=eval.jsonl --engine=vllm            # GPU node with vllm installed

Engines: `hf_generate` (any machine: our own KV-cached decode loop, explicit positions, vision/pad tokens
suppressed; on a GPU its decode step is fused_decode.py's static KV cache, fused decoder and CUDA graph) and
`VLLMEngine` (GPU nodes: one colocated vLLM per torchrun rank, sleep/wake, in-place weight push).
Both return the same `Rollout` records. The script always prints which engine ran.
"""
import json
import logging
import os
import resource
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoProcessor, DynamicCache,
                          Qwen2_5OmniConfig)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cache_embeddings import load_cached
from common import all_reduce, barrier
from configurator import parse_config
from data.datasets import format_question, load_jsonl
from data.rewards import compute_rewards, eval_correct, read_answer
from data.video import FrameSampling, SampledVideo, fit_size
from fused_decode import StaticKV, fused_decoding, fused_forward, graphed_step, padded_prompt_mask, unshard_layers
from sp import chunked_all_gather_object
from vlm import (MROPE, SUPPORTED, build_prompt, build_prompt_cached, decoder_hidden, embed_inputs, encode_videos,
                 eos_ids, family, load_model, load_video, lockstep, masked_logits, omni_positions, output_head,
                 sampled_fps, select_videos, sharded, suppress_ids, text_model, use_attention, video_kwargs)


# ----------------------------------------------------------------------------------------------------------
# the HF engine: our own decode loop with a KV cache, explicit 3-D positions and left padding

@dataclass
class Rollout:
    prompt_index: int               # which prompt of the batch this answers
    prompt_ids: list
    response_ids: list              # up to and including the stop token
    text: str
    logprobs: list = None           # log p(token) under log_softmax(logits / T) at sampling time
    finished: bool = True           # False: cut at max_new_tokens


def all_ranks_done(done: torch.Tensor) -> bool:
    """Under FSDP every rank must run the same number of forwards: stop only when all ranks are done."""
    flag = done.all().to(torch.int32).reshape(1)
    return bool(all_reduce(flag, op=dist.ReduceOp.MIN if dist.is_initialized() else None))


def left_padded(prompts: list, max_new_tokens: int, pad_id: int):
    """The prompts as one batch, left-padded so that every prompt ends at column L-1 (the first response token is
    column L for all). Returns ids [P, L], positions [3, P, L] and attention [P, L + max_new_tokens]: 1 at real
    tokens and at every response column, 0 at padding."""
    L = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    pos = torch.zeros(3, len(prompts), L, dtype=torch.long)
    attn = torch.zeros(len(prompts), L + max_new_tokens, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p.input_ids):], pos[:, i, L - len(p.input_ids):] = p.input_ids, p.positions
        attn[i, L - len(p.input_ids):] = 1
    attn[:, L:] = 1
    return ids, pos, attn


@contextmanager
def static_kv_decoder(model, ids, pos, attn, feats, n: int, fused: bool, compile_kernels: bool, cuda_graph: bool,
                      pad_id: int):
    """The prompt pass on a StaticKV cache, then a decode step `step(tok [B], positions [3, B, 1]) -> hidden
    [B, 1, hidden]` with static shapes. Yields (the prompt pass's hidden states [P, L, hidden], step). The prompt
    pass runs once per prompt; StaticKV.write copies its keys and values to the prompt's n sample rows. On exit,
    however it ends, the model's own attention function is back and FSDP2 layers are resharded."""
    L, B = ids.shape[1], ids.shape[0] * n
    kv = StaticKV(model, attn.bool().repeat_interleave(n, dim=0))
    AttentionInterface.register(StaticKV.NAME, kv.attend)
    AttentionMaskInterface.register(StaticKV.NAME, sdpa_mask)
    previous, gathered = use_attention(model, StaticKV.NAME), []
    try:
        if fused:  # the prompt pass too through our fused layers (Qwen3-VL's DeepStack video inputs: its own)
            gathered = unshard_layers(model)
            forward, embed = fused_forward(model, kv, compile_kernels), text_model(model).embed_tokens
            step = lambda tok, step_pos: forward(embed(tok[:, None]), step_pos)
        if fused and getattr(feats, "deepstack_features", None) is None:
            mask = padded_prompt_mask(attn[:, :L].bool()) if bool((attn == 0).any()) else None
            hidden = forward(embed_inputs(model, ids, feats)[0], pos, mask)
        else:
            hidden, _ = decoder_hidden(model, ids, pos, feats, attn[:, :L])   # through StaticKV.attend
            kv.length += L
        if not fused:
            def step(tok, step_pos):
                out, _ = decoder_hidden(model, tok[:, None], step_pos)
                kv.length += 1
                return out
        if cuda_graph:
            example = torch.full((B,), pad_id, device=ids.device), pos[:, :1, -1:].expand(3, B, 1)
            step = graphed_step(step, kv, *example)
        yield hidden, step
    finally:
        use_attention(model, previous)
        kv.release()            # the registry still holds kv.attend: free the cache itself now
        for layer in gathered:  # FSDP2: back to shards (the graph and the fused weights are dropped with `step`)
            layer.reshard()


@contextmanager
def dynamic_cache_decoder(model, ids, pos, attn, feats, n: int):
    """The same as static_kv_decoder on transformers' DynamicCache and the model's own layers (the CPU default):
    the cache grows a slot a token, and the attention mask is sliced to the length so far."""
    L = ids.shape[1]
    cache = DynamicCache(config=model.config.get_text_config())
    hidden, _ = decoder_hidden(model, ids, pos, feats, attn[:, :L], cache)
    cache.batch_repeat_interleave(n)                                          # the n samples of each prompt
    attn = attn.repeat_interleave(n, dim=0)

    def step(tok, step_pos):
        length = cache.get_seq_length() + 1                                   # the cache + this token
        return decoder_hidden(model, tok[:, None], step_pos, None, attn[:, :length], cache)[0]
    yield hidden, step


def sample_token(logits, temperature: float, top_p: float, gen):
    """One token per row from logits [B, V] (already divided by the temperature). Returns the tokens [B] and
    log_softmax(logits) [B, V], the log-probs the training forward recomputes (before top-p truncation)."""
    logp = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        return logits.argmax(-1), logp
    probs = logp.exp()
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sp, si = probs.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p  # the mass before this token already reaches top_p (as HF, vLLM)
        drop[..., 0] = False  # the most likely token always stays (top_p = 0: greedy sampling)
        probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen)[:, 0], logp


@torch.no_grad()
def hf_generate(model, processor, prompts: list, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                max_new_tokens: int = 256, seed: int = 0, feats=None, static_cache=None, fused=None,
                compile_kernels=None, cuda_graph=None, check_every=None, on_token=None) -> list:
    """n samples for each prompt. temperature 0 = greedy. Returns len(prompts) * n Rollouts, grouped by prompt.
    The returned log-probs are those of log_softmax(logits / T) over the allowed vocabulary (before top-p
    truncation), which is exactly what the training forward recomputes.
    The decode step, fastest first (the defaults on a GPU; README "Performance" has the measurements):
      fused            our own decoder from the layers' weights (fused_forward) on a StaticKV cache, for the
                       prompt pass and the decode step
      compile_kernels  its elementwise helpers compiled into one kernel each
      cuda_graph       one decode step recorded as a CUDA graph and replayed: one launch per token
      static_cache     the model's own layers on a StaticKV cache (fused=False; families outside
                       fused_decode.FUSED_LAYERS)
      otherwise        the model's own layers on transformers' DynamicCache (the default on CPU)
    Whether every sequence has stopped is asked every `check_every` tokens (default: 8 on a GPU, where each ask
    waits for the GPU to finish; 1 on CPU). on_token(ids): called after every step with the token each row just
    sampled (a list; pad after a row stopped), so a caller can stream the answer (web_demo.py); it waits for
    the GPU at every token."""
    dev = output_head(model).weight.device
    static_cache = (dev.type == "cuda") if static_cache is None else static_cache
    fused = (static_cache and fused_decoding(model)) if fused is None else fused
    compile_kernels = (fused and dev.type == "cuda") if compile_kernels is None else compile_kernels
    cuda_graph = (static_cache and dev.type == "cuda") if cuda_graph is None else cuda_graph
    check_every = check_every or (8 if dev.type == "cuda" else 1)
    if fused and not static_cache:
        raise ValueError("fused decoding needs static_cache=True")
    pad_id = processor.tokenizer.pad_token_id
    stop, suppress = eos_ids(model, processor), suppress_ids(model, processor)
    if feats is None and any(p.video_grid_thw is not None for p in prompts):
        feats = encode_videos(model, prompts)
    ids, pos, attn = (x.to(dev) for x in left_padded(prompts, max_new_tokens, pad_id))
    order = [i for i in range(len(prompts)) for _ in range(n)]   # row b of the batch samples prompts[order[b]]
    B = len(order)
    gen = torch.Generator(device=dev).manual_seed(seed)
    decoder = (static_kv_decoder(model, ids, pos, attn, feats, n, fused, compile_kernels, cuda_graph, pad_id)
               if static_cache else dynamic_cache_decoder(model, ids, pos, attn, feats, n))
    with decoder as (hidden, step):
        hidden = hidden[:, -1:].repeat_interleave(n, dim=0)                     # [B, 1, hidden]
        next_pos = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(n)               # [B]
        out_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros(B, max_new_tokens, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.full((B,), max_new_tokens, device=dev)
        stop_t, suppress = torch.tensor(stop, device=dev), torch.tensor(suppress, dtype=torch.long, device=dev)
        for t in range(max_new_tokens):
            logits = masked_logits(model, hidden[:, -1], suppress, temperature if temperature > 0 else 1.0)
            tok, logp = sample_token(logits, temperature, top_p, gen)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out_ids[:, t], out_lp[:, t] = tok, logp.gather(-1, tok[:, None])[:, 0]
            newly = ~done & torch.isin(tok, stop_t)
            lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
            done |= newly
            if on_token is not None:
                on_token(tok.tolist())
            if t == max_new_tokens - 1 or (t + 1) % check_every == 0 and all_ranks_done(done):
                break
            hidden = step(tok, next_pos.view(1, B, 1).expand(3, B, 1))
            next_pos = next_pos + 1
    results = []
    for b, i in enumerate(order):
        k = int(lengths[b])
        resp = out_ids[b, :k].tolist()
        results.append(Rollout(prompt_index=i, prompt_ids=prompts[i].input_ids.tolist(), response_ids=resp,
                               text=processor.tokenizer.decode(resp, skip_special_tokens=True),
                               logprobs=out_lp[b, :k].tolist(), finished=bool(done[b])))
    return results


# ----------------------------------------------------------------------------------------------------------
# the vLLM engine (GPU nodes): one colocated engine per torchrun rank, asleep while the trainer works.
# Written against the API that vLLM 0.24 and 0.33 share (notes/vllm.md); executed with 0.24.0 (README).

def position_table_reload_noise(record: logging.LogRecord) -> bool:
    """Logging filter for vLLM's layerwise reload (vllm 0.24: vllm.model_executor.model_loader.reload.layerwise):
    it warns "<Layer>: Failed to load weights" for every module that got no tensor in a weight push. Position
    tables never get one: the decoders' rotary cos/sin caches and the Omni audio encoder's sinusoids are computed,
    not trained, and are no state_dict entries (vLLM keeps them as they were), so those lines go; the line for
    any other layer stays, since that would be a weight we failed to push."""
    message = record.getMessage()
    return not (message.endswith("Failed to load weights") and ("Rotary" in message or "Sinusoids" in message))


class VLLMEngine:
    """One colocated vLLM per torchrun rank. The training loop drives it in the order things happen:
        engine.wake()               weights and KV cache on the GPU
        engine.generate(...)        the rollout
        engine.sleep()              KV cache freed, weights to CPU (sleep level 1): the GPU is the trainer's
        engine.load_weights(...)    the updated policy, copied in place (wakes the weights only)"""

    def __init__(self, model_path: str, gpu_memory_utilization: float = 0.5, max_model_len: int = 32768,
                 seed: int = 0, max_frames: int = 768, enforce_eager: bool = False, sleep_level: int = 1,
                 prompt_embeds: bool = False, omni: bool = False, processor=None):
        """prompt_embeds: model_path is an embedding VLM's language model alone (export_language_model), fed
        the prompts' inputs_embeds computed by the trainer (Long-RL's LongVILA-R1 llm/ folder works the same).
        omni: model_path is a Qwen2.5-Omni thinker's vLLM folder (export_omni_config): config and processor, no
        weights; the engine starts from random weights and load_weights must push the thinker's before
        generate. processor: the trainer's, whose video settings every request carries (None: loaded from
        model_path)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights by reference
        # vLLM's INFO lines (~40 at start-up, then every sleep and wake-up) would bury the run's own console;
        # its warnings stay. VLLM_LOGGING_LEVEL=INFO brings them back. Read when vllm is first imported.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import LLM  # late: vllm is optional (GPU nodes only)
        except ImportError:
            raise SystemExit("--engine=vllm needs vllm (pip install vllm on a GPU node); --engine=hf works anywhere")
        multi = dist.is_initialized()  # under torchrun: every rank its own engine, reusing the process group
        self.prompt_mismatches = 0      # prompts that vLLM tokenized differently from our processor path
        self.sleep_level = sleep_level  # 1 keeps weights in CPU memory; 2 leaves garbage in any weight not pushed
        self.prompt_embeds = prompt_embeds
        self.omni = omni
        self.weights_pushed = not omni  # an Omni engine holds random weights until the first load_weights
        self.processor_kwargs = {} if prompt_embeds else \
            engine_processor_kwargs(processor or AutoProcessor.from_pretrained(model_path), omni)
        media = {"enable_prompt_embeds": True} if prompt_embeds else \
            {"limit_mm_per_prompt": {"video": 1, "image": 0, **({"audio": 1} if omni else {})}}
        if omni:
            media["load_format"] = "dummy"  # the folder has no weights: the first push brings them
            register_omni_thinker()
        self.llm = LLM(model=model_path, enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, seed=seed, dtype="bfloat16", enforce_eager=enforce_eager,
                       **media,
                       # every rank builds its own engine together with the others (external_launcher)
                       distributed_executor_backend="external_launcher" if multi else None,
                       # log-probs after temperature: log_softmax(logits / T), what the trainer recomputes
                       logprobs_mode="processed_logprobs")
        self.tokenizer = self.llm.get_tokenizer()
        self.awake = {"weights": True, "kv_cache": True}
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(position_table_reload_noise)

    def wake(self):
        """Whatever sleeps (the KV cache, and the weights unless load_weights woke them) back on the GPU."""
        asleep = [tag for tag, on in self.awake.items() if not on]
        if asleep:
            self.llm.wake_up(tags=asleep)
            self.awake = dict.fromkeys(self.awake, True)

    def sleep(self):
        self.llm.sleep(level=self.sleep_level)
        self.awake = dict.fromkeys(self.awake, False)

    def load_weights(self, named_tensors):
        """Copy new weights in place (HF names; vLLM fuses q/k/v and gate/up itself) and drop every cache computed
        with the old ones. Wakes the weights only: the KV cache stays free until wake(). Never call
        reload_weights without an iterator after a push: that reloads the checkpoint from disk."""
        if not self.awake["weights"]:
            self.llm.wake_up(tags=["weights"])
            self.awake["weights"] = True
        if self.prompt_embeds:  # the language model only, under a causal LM's names
            named_tensors = language_model_weights(named_tensors)
        if self.omni:  # the whole Omni's checkpoint names, which vLLM's thinker maps (thinker.model. -> ...)
            named_tensors = (("thinker." + name, t) for name, t in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors,
                                                          "is_checkpoint_format": True})
        self.weights_pushed = True
        self.llm.reset_prefix_cache()
        # vision features computed by the old vision tower, and processed inputs (whichever this version has)
        for reset in (getattr(self.llm.llm_engine, "reset_encoder_cache", None),
                      getattr(self.llm, "reset_mm_cache", None)):
            if reset is not None:
                reset()

    def generate(self, prompts: list, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0, suppress_ids=(),
                 embeds=None):
        """embeds: with prompt_embeds, one [L, hidden] CPU tensor per prompt (prompt_embeddings)."""
        from vllm import SamplingParams  # late: vllm is optional
        if not all(self.awake.values()):
            raise RuntimeError("the vLLM engine is asleep: call engine.wake() before generate()")
        if not self.weights_pushed:
            raise RuntimeError("this Omni engine holds random weights: call engine.load_weights(full_tensors(model))")
        # the vision/pad tokens can never be sampled (a sampled <|video_pad|> breaks re-scoring): bias them away.
        # One seed per prompt: vLLM gives the k-th of n samples seed + k, so with one shared seed the k-th samples
        # of all prompts would draw the same random numbers (and, while the policy ignores the video, the same
        # answer); prompt i's samples get seed + i * n ... seed + i * n + n - 1, all distinct, as in the HF engine
        bias = {int(i): -100.0 for i in suppress_ids} or None
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                 seed=seed + i * n, logit_bias=bias) for i in range(len(prompts))]
        requests = [vllm_request(p, self.processor_kwargs, self.omni) for p in prompts]
        if self.prompt_embeds:
            if embeds is None or len(embeds) != len(prompts):
                raise ValueError("this engine runs an embedding VLM's language model: pass "
                                 "embeds=rollout.prompt_embeddings(model, prompts)")
            requests = [{"prompt_embeds": e} for e in embeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for i, (p, out) in enumerate(zip(prompts, outputs)):
            if not self.prompt_embeds and list(out.prompt_token_ids) != p.input_ids.tolist():  # we re-score OUR ids
                self.prompt_mismatches += 1
            for o in out.outputs:
                ids = list(o.token_ids)
                results.append(Rollout(prompt_index=i, prompt_ids=p.input_ids.tolist(), response_ids=ids,
                                       text=o.text, logprobs=[lp[t].logprob for lp, t in zip(o.logprobs, ids)],
                                       finished=o.finish_reason == "stop"))
        return results


def engine_processor_kwargs(processor, omni: bool) -> dict:
    """The processor arguments every video request to vLLM carries, so that vLLM's processing is ours:
    vlm.video_kwargs (no second pixel cap: frames are already sized, and transformers warns on every video
    until told) and, for Qwen2.5-Omni, its video processor's own size (else the Omni processor's class default
    would resize the frames again)."""
    kwargs = video_kwargs(processor)
    if omni:
        kwargs["size"] = {k: v for k, v in dict(processor.video_processor.size).items() if v is not None}
    return kwargs


def vllm_request(p, processor_kwargs: dict, omni: bool = False) -> dict:
    """One prompt as vLLM takes it: our prompt text and the decoded frames (vLLM's processor expands the
    placeholder as ours does: VLLMEngine.generate counts any difference in prompt_mismatches), with
    engine_processor_kwargs; text-only: our ids. Qwen2.5-Omni: the frames' real spacing (the processor assumes
    2 fps unless told, and the time positions follow it) and, when our prompt heard it, the video's own audio
    track in the interleaved layout (use_audio_in_video: the 2-second chunks vlm.omni_layout writes), never cut
    at 30 s (truncation=False)."""
    if p.frames is None:
        return {"prompt_token_ids": p.input_ids.tolist()}
    video = (p.frames.frames, {**p.frames.metadata(), "do_sample_frames": False})
    request = {"prompt": p.text, "multi_modal_data": {"video": [video]}}
    kwargs = dict(processor_kwargs)
    if omni:
        kwargs.update(fps=sampled_fps(p.frames.metadata()), do_sample_frames=False)
        if p.num_audio_tokens:
            request["multi_modal_data"]["audio"] = [(p.frames.audio, 16000)]
            kwargs.update(use_audio_in_video=True, truncation=False)
    if kwargs:
        request["mm_processor_kwargs"] = kwargs
    return request


OMNI_ARCHITECTURE = "LongRLQwen2_5OmniThinker"  # vLLM's thinker with our positions (register_omni_thinker)


def omni_request_positions(config, input_tokens, mm_features):
    """(positions [3, L], decode offset) of one vLLM request from its prompt ids and multimodal features (vLLM's
    MultiModalFeatureSpec: .modality, .data[name].data), by vlm.omni_positions, for the requests we send (one
    video, with or without its audio); None for anything else (vLLM's own rule then). The offset puts answer
    token i at max + 1 + i, as transformers' generate() and vlm.continue_positions do."""
    videos = [f for f in mm_features if f.modality == "video"]
    if len(videos) != 1 or any(f.modality not in ("video", "audio") for f in mm_features):
        return None
    data = videos[0].data
    sec = data.get("second_per_grid_ts")
    positions = omni_positions(config, list(input_tokens), data["video_grid_thw"].data.tolist(),
                               float(sec.data) if sec is not None else 1.0)
    return positions, int(positions.max()) + 1 - len(input_tokens)


def register_omni_thinker():
    """Register OMNI_ARCHITECTURE with vLLM (its public ModelRegistry; nothing in vLLM is changed): vLLM's own
    Qwen2.5-Omni thinker (weights, processor, encoders, kernels) with one method replaced, the 3-D positions of a
    prompt. vllm 0.24 lays the interleaved <video chunk><audio chunk> block out exactly as we do (the prompt ids
    are equal) but shifts its positions by one token: its placeholder starts at <|audio_bos|> and its rule starts
    the block there, so each token inside gets the position of the token after it (measured on an H100: log-probs
    0.07 apart on average, 0.25 at most, against 0.01 for Qwen2.5-VL). A request that is not one video (+ its
    audio) keeps vLLM's rule."""
    from vllm import ModelRegistry  # late: vllm is optional (GPU nodes only)
    from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerForConditionalGeneration

    class Thinker(Qwen2_5OmniThinkerForConditionalGeneration):
        def get_mrope_input_positions(self, input_tokens, mm_features):
            ours = omni_request_positions(self.config, input_tokens, mm_features)
            return ours if ours is not None else super().get_mrope_input_positions(input_tokens, mm_features)

    ModelRegistry.register_model(OMNI_ARCHITECTURE, Thinker)


def export_omni_config(model, processor, out_dir: str) -> str:
    """A Qwen2.5-Omni thinker as vLLM loads one, into out_dir: vLLM builds Omni from the whole model's config
    (Qwen2_5OmniConfig; its thinker class only, the talker never, here under OMNI_ARCHITECTURE: the thinker with
    our positions) and reads the thinker's weights under thinker.*. The folder holds that config around our
    thinker's and the processor, no weights (a 7B thinker is not written to disk again): VLLMEngine(omni=True)
    starts from random weights and takes the policy's by the same push as after every update."""
    config = Qwen2_5OmniConfig(thinker_config=model.config.to_dict(), enable_audio_output=False)
    config.architectures = [OMNI_ARCHITECTURE]  # vLLM's Qwen2_5OmniModel with our positions (register_omni_thinker)
    config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def make_engine(cfg, model, processor, model_path: str, lm_dir: str, seed: int, sleep_level: int = 1):
    """The rollout engine that cfg.engine names: None = the HF engine (hf_generate on the policy itself), or a
    colocated VLLMEngine. Embedding VLMs (LLaVA, VILA): vLLM runs their language model alone, exported to
    lm_dir by rank 0, on the prompt embeddings the trainer computes (prompt_embeddings). Qwen2.5-Omni: vLLM's
    own thinker from a config-only folder in lm_dir (export_omni_config): the caller pushes the weights before
    the first generate, as train_grpo.py does for every engine."""
    if cfg.engine == "hf":
        return None
    if getattr(cfg, "embeddings_cache", ""):  # training and CLI configs have it; the web demo's does not
        raise ValueError("--embeddings_cache works with --engine=hf only: the vLLM engine is handed decoded frames")
    omni, embeds_only = family(model).startswith("qwen2_5_omni"), family(model) not in MROPE
    if omni or embeds_only:
        if not dist.is_initialized() or dist.get_rank() == 0:
            (export_omni_config if omni else export_language_model)(model, processor, lm_dir)
        barrier()
    return VLLMEngine(lm_dir if omni or embeds_only else model_path, cfg.gpu_memory_utilization, cfg.max_model_len,
                      seed=seed, max_frames=cfg.max_frames, sleep_level=sleep_level, prompt_embeds=embeds_only,
                      omni=omni, processor=processor)


def full_tensors(model, dtype=torch.bfloat16):
    """(HF name, full tensor) for every weight, one at a time (FSDP2 shards are gathered on the fly): what
    engine.load_weights streams into vLLM."""
    for name, t in model.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, t.to(dtype)


def language_model_weights(named_tensors):
    """An embedding VLM's (name, tensor) stream -> its decoder + lm_head under causal-LM names (LLaVA:
    model.language_model.* and lm_head.*; VILA: llm.*, already a causal LM)."""
    renames = (("model.language_model.", "model."), ("lm_head.", "lm_head."), ("llm.", ""))
    for name, t in named_tensors:
        for prefix, to in renames:
            if name.startswith(prefix):
                yield to + name[len(prefix):], t
                break


def export_language_model(model, processor, out_dir: str) -> str:
    """Write an embedding VLM's decoder + lm_head as a causal-LM folder (config, weights, tokenizer) for vLLM."""
    lm = AutoModelForCausalLM.from_config(model.config.get_text_config())
    lm.load_state_dict(dict(language_model_weights(model.state_dict().items())))
    lm.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def prompt_embeddings(model, prompts: list) -> list:
    """Each prompt's inputs_embeds [L, hidden] on the CPU (media features in place): vLLM's prompt_embeds."""
    feats = encode_videos(model, prompts)
    return [embed_inputs(model, p.input_ids[None].to(model.device), select_videos(feats, [i]))[0][0].cpu()
            for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------------------------------------
# evaluation and the command line

def prepare_prompts(model, processor, samples: list, cfg, think: bool, skipped: list, cache_dir: str = "",
                    misses: list = None):
    """Prompts for the samples whose video decodes; a bad video is skipped, counted and named, never fatal.
    With cache_dir (cache_embeddings.py's output) a cached video is neither decoded nor encoded; a video with no
    entry is decoded live and its path appended to `misses`; a stale entry raises (cache_embeddings.load_cached)."""
    prompts = []
    for s in samples:
        if cache_dir:
            entry = load_cached(cache_dir, s.video, cfg, model)
            if entry is not None:
                prompts.append(build_prompt_cached(model, processor, format_question(s), entry, think, sample=s))
                continue
            if misses is not None:
                misses.append(s.video)
        try:
            video = load_video(s.video, cfg, family(model))
        except (ValueError, OSError) as e:
            skipped.append(f"{s.source or s.video}: {e}")
            continue
        prompts.append(build_prompt(model, processor, format_question(s), video, think, sample=s))
    return prompts


def placeholder_prompt(model, processor, cfg):
    """A blank two-frame clip at the smallest frame size, for a rank that has nothing of its own to run while its
    FSDP2 peers do (every rank must call every sharded module as often as the others): its results are dropped."""
    side = 2 * SUPPORTED[family(model)]
    h, w = fit_size(side, side, SUPPORTED[family(model)], cfg.min_pixels, cfg.max_pixels)
    clip = SampledVideo(frames=np.zeros((2, h, w, 3), dtype=np.uint8), timestamps=np.array([0.0, 0.5]),
                        indices=[0, 1], fps=2.0, total_frames=2, duration=1.0)
    return build_prompt(model, processor, "placeholder", clip, think=False)


def next_prompts(loader, want: int, model, processor, cfg, data_file: str, skipped: list, misses: list,
                 max_batches: int = 8) -> list:
    """`want` prompts from the loader's next batches. A row whose video does not load is skipped (named in
    `skipped`) and refilled from the following batches, up to max_batches; every rank draws the same number of
    batches (so all loaders stay at one position, which --resume restores), a rank's extra prompts are dropped.
    If some rank loads no video at all, every rank stops with an error naming the data file and the failures."""
    prompts, first_skip = [], len(skipped)
    for _ in range(max_batches):
        prompts += prepare_prompts(model, processor, loader.next_batch(), cfg, cfg.think, skipped,
                                   cfg.embeddings_cache, misses)
        short = torch.tensor([float(len(prompts) < want)])
        if all_reduce(short, op=dist.ReduceOp.MAX if dist.is_initialized() else None).item() == 0:
            break
    empty = torch.tensor([float(not prompts)])
    if all_reduce(empty, op=dist.ReduceOp.MAX if dist.is_initialized() else None).item() > 0:
        failures = "; ".join(skipped[first_skip:first_skip + 3]) or "(on another rank)"
        raise RuntimeError(f"{data_file}: no video loaded on at least one rank in {max_batches} batches of "
                           f"{loader.batch_size} rows; first failures: {failures}. Check that the videos exist "
                           "relative to the jsonl's folder (or are absolute paths).")
    return prompts[:want]


def sample_responses(policy, engine, processor, prompts: list, cfg, seed: int, suppress, spi):
    """cfg.n responses per prompt (rollout.Rollout records, grouped by prompt_index) from the colocated vLLM engine
    or the HF engine. Under SP every peer of a group ends with the same n responses of each prompt."""
    split = cfg.sp_size > 1 and cfg.sp_split_rollout  # SP peers each sample n/sp responses of the same prompts
    n_local = cfg.n // cfg.sp_size if split else cfg.n
    seed += spi.sp_rank if split else 0
    if engine:
        embeds = policy(prompt_embeddings, prompts) if engine.prompt_embeds else None
        outs = engine.generate(prompts, n_local, cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed, suppress,
                               embeds)
    else:
        outs = policy(hf_generate, processor, prompts, n_local, cfg.temperature, cfg.top_p,
                      cfg.max_new_tokens, seed)
    if split:  # every SP peer gets all n responses, grouped by prompt (gathered in chunks)
        parts = chunked_all_gather_object(outs, 4, spi.sp_group)
        outs = sorted([o for part in parts for o in part], key=lambda o: o.prompt_index)
    elif cfg.sp_size > 1:  # peers sampled the same (same seed); take SP rank 0's copy so they agree exactly
        box = [outs]
        dist.broadcast_object_list(box, src=dist.get_rank() - spi.sp_rank, group=spi.sp_group)
        outs = box[0]
    return outs


def evaluate(model, processor, samples: list, cfg, engine=None, desc="eval", cache_dir: str = "",
             prepared: tuple = None) -> dict:
    """Greedy answers for every sample; accuracy overall and per category; predictions and skipped videos.
    prepared: (prompts, skipped) that prepare_prompts already made of these samples (train_sft's evaluation has
    them for its held-out loss): answered as they are, no video decoded again."""
    preds, skipped, misses = [], list(prepared[1]) if prepared else [], []
    total = len(prepared[0]) if prepared else len(samples)
    starts = range(0, total, cfg.eval_batch_size)
    # under FSDP2 every rank runs the policy on as many batches as the busiest (lockstep), spare ones on a
    # placeholder clip whose answers are dropped: the HF engine generates with it, and for vLLM's prompt
    # embeddings (LLaVA, VILA) it encodes the frames; vLLM's engines themselves answer on their own
    together = (engine is None or engine.prompt_embeds) and sharded(text_model(model).layers[0])
    num_batches = lockstep(len(starts), text_model(model).layers[0], model.device) if together else len(starts)
    for b in tqdm(range(num_batches), desc=desc, disable=not cfg.progress):
        start = starts[b] if b < len(starts) else total
        if prepared:
            prompts = prepared[0][start:start + cfg.eval_batch_size]
        else:
            prompts = prepare_prompts(model, processor, samples[start:start + cfg.eval_batch_size], cfg, cfg.think,
                                      skipped, cache_dir, misses)
        if not prompts:
            if together and engine is None:
                hf_generate(model, processor, [placeholder_prompt(model, processor, cfg)], n=1, temperature=0.0,
                            max_new_tokens=cfg.max_new_tokens)
            elif together:
                prompt_embeddings(model, [placeholder_prompt(model, processor, cfg)])
            continue
        if engine is not None:
            embeds = prompt_embeddings(model, prompts) if engine.prompt_embeds else None
            outs = engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, embeds=embeds)
        else:
            outs = hf_generate(model, processor, prompts, n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        scores = compute_rewards([o.text for o in outs], [prompts[o.prompt_index].sample.to_dict() for o in outs],
                                 think=cfg.think)
        for o, acc, fmt in zip(outs, scores["accuracy"], scores["format"]):
            s = prompts[o.prompt_index].sample
            read, how = read_answer(o.text, s.to_dict())  # any answer shape, and which shape it was
            preds.append({**s.to_dict(), "response": o.text, "correct": float(acc), "format": float(fmt),
                          "read": read, "read_as": how, "correct_any_shape": eval_correct(read, s.to_dict())})
    by_cat = {}
    for p in preds:
        by_cat.setdefault(p["category"] or "all", []).append(p["correct"])
    acc = sum(p["correct"] for p in preds) / max(len(preds), 1)
    shaped = [p["correct_any_shape"] for p in preds if p["correct_any_shape"] is not None]
    read_as = Counter(p["read_as"] for p in preds)
    return {"accuracy": acc, "accuracy_any_shape": sum(shaped) / len(shaped) if shaped else float("nan"),
            "read_as": dict(read_as.most_common()),
            "format": sum(p["format"] for p in preds) / max(len(preds), 1),
            "per_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())}, "num_scored": len(preds),
            "skipped": skipped, "predictions": preds, "cache_misses": len(misses)}


def evaluate_all(policy, processor, samples: list, cfg, engine, tag: str, out_dir: str, prepared: tuple = None) -> dict:
    """Held-out accuracy over all ranks (the FSDP root `policy`): each rank answers every world_size-th row, the
    counts are summed; rank 0 writes its predictions to out_dir/eval_{tag}.jsonl. prepared: this rank's rows
    (samples[rank::world]) already made into (prompts, skipped) by prepare_prompts."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    policy.eval()
    res = policy(evaluate, processor, samples[rank::world], cfg, engine, desc=f"eval {tag}",
                 cache_dir=cfg.embeddings_cache, prepared=prepared)
    sums = all_reduce(torch.tensor([res["accuracy"] * res["num_scored"], res["format"] * res["num_scored"],
                                    float(res["num_scored"]), float(len(res["skipped"]))]))
    out = {"accuracy": (sums[0] / sums[2].clamp(min=1)).item(), "format": (sums[1] / sums[2].clamp(min=1)).item(),
           "num_scored": int(sums[2]), "skipped": int(sums[3])}
    if rank == 0:
        with open(os.path.join(out_dir, f"eval_{tag}.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in res["predictions"])
        if out["skipped"]:  # videos that did not load, counted over all ranks (each rank's names stay with it)
            print(f"eval {tag}: {out['skipped']} of {len(samples)} held-out videos skipped (not loadable)")
    return out


@dataclass
class InferenceConfig(FrameSampling):  # fps, num_frames, max_frames, max_pixels, min_pixels: data/video.py
    """What answering needs (load_for_inference and the sampling settings): the CLI's RolloutConfig and the web
    demo's WebConfig add their own fields to it."""
    model: str = ""                 # checkpoint folder or hub id (Qwen2.5-VL, Qwen3-VL, Qwen2.5-Omni, LLaVA-format)
    engine: str = "hf"              # hf (any machine) | vllm (GPU node with vllm installed)
    think: bool = True              # Long-RL's think/answer system prompt (use_thinking)
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0              # nucleus sampling mass
    max_new_tokens: int = 1024      # response length cap
    dtype: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (if installed) | eager
    device: str = "auto"            # auto | cpu | cuda
    gpu_memory_utilization: float = 0.6  # vLLM: fraction of the whole GPU for weights + KV cache
    max_model_len: int = 32768      # vLLM: longest prompt + response
    seed: int = 0                   # sampling seed


@dataclass
class RolloutConfig(InferenceConfig):
    video: str = ""                 # a video to ask one question about
    question: str = ""              # the question for --video
    eval: str = ""                  # an eval jsonl (data/datasets.py format): accuracy per category
    out: str = ""                   # predictions jsonl for --eval (default: <eval>.predictions.jsonl)
    eval_batch_size: int = 8        # prompts per generation batch
    progress: bool = True           # tqdm progress bars
    embeddings_cache: str = ""      # --eval: cache_embeddings.py output; cached videos skip decoding and the tower


def eval_settings(cfg: RolloutConfig, model) -> dict:
    """What an evaluation's score depends on besides the weights: written first into the predictions file. The
    answers are greedy (evaluate): temperature 0 whatever --temperature says, and no top-p or seed."""
    return {"model": cfg.model, "family": family(model), "engine": cfg.engine, "num_frames": cfg.num_frames,
            "fps": cfg.fps, "max_frames": cfg.max_frames, "max_pixels": cfg.max_pixels, "min_pixels": cfg.min_pixels,
            "think": cfg.think, "temperature": 0.0, "max_new_tokens": cfg.max_new_tokens,
            "embeddings_cache": cfg.embeddings_cache, "date": time.strftime("%Y-%m-%d")}


def load_for_inference(cfg: InferenceConfig):
    """(model, processor, engine) for the CLI and web_demo.py: the model in eval mode on cfg.device, and a vLLM
    engine when cfg.engine == "vllm" (else None: the HF engine, hf_generate). Prints which engine runs."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, processor = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, device)
    model.eval()
    engine = None
    if cfg.engine == "vllm":  # the folder for an Omni config or an embedding VLM's language model: a temporary one
        engine = make_engine(cfg, model, processor, cfg.model, tempfile.mkdtemp(prefix="longrl_vllm_"), cfg.seed)
    if engine and not engine.weights_pushed:  # Omni: the engine's folder has no weights
        engine.load_weights(full_tensors(model))
    print(f"engine: {'vLLM' if engine else 'HF (transformers, our KV-cached decode loop)'}; device {device}; "
          f"attention {model.config._attn_implementation}")
    return model, processor, engine


def main(cfg: RolloutConfig):
    if not cfg.model or not (cfg.eval or (cfg.video and cfg.question)):
        raise SystemExit("give --model and either --eval=FILE or --video=FILE --question=TEXT (see --help)")
    if cfg.embeddings_cache and cfg.engine == "vllm":
        raise SystemExit("--embeddings_cache works with --engine=hf only: the vLLM engine is handed decoded frames")
    model, processor, engine = load_for_inference(cfg)
    # before any video is decoded: a cap past the context would fail later, in the allocator
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if cfg.max_new_tokens < 1 or (context and cfg.max_new_tokens > context):
        raise SystemExit(f"--max_new_tokens={cfg.max_new_tokens}: give 1 to {context or 'the context length'} "
                         f"(max_position_embeddings of {cfg.model}'s text config)")
    if cfg.eval:
        if (cfg.temperature, cfg.top_p) != (0.0, 1.0):
            print("--eval answers greedily: --temperature and --top_p are not used")
        t0 = time.time()
        res = evaluate(model, processor, load_jsonl(cfg.eval), cfg, engine, cache_dir=cfg.embeddings_cache)
        out = cfg.out or os.path.splitext(cfg.eval)[0] + ".predictions.jsonl"  # (a dot in a folder name: kept)
        settings = eval_settings(cfg, model)
        with open(out, "w") as f:  # line 1: the settings that produced these answers; then one line per answer
            f.write(json.dumps({"settings": settings}) + "\n")
            f.writelines(json.dumps(p) + "\n" for p in res["predictions"])
        for line in res["skipped"]:
            print(f"skipped: {line}")
        print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
        print(f"accuracy {res['accuracy']:.3f} on {res['num_scored']} samples ({len(res['skipped'])} skipped), "
              f"format {res['format']:.3f}, {time.time() - t0:.1f} s; predictions: {out}")
        print(f"answers read in any shape (data/rewards.read_answer): accuracy {res['accuracy_any_shape']:.3f}; "
              "read as " + ", ".join(f"{how} {count}" for how, count in res["read_as"].items()))
        if cfg.embeddings_cache:
            print(f"embeddings cache: {res['cache_misses']} videos were not in it (decoded live)")
        for cat, acc in res["per_category"].items():
            print(f"  {cat}: {acc:.3f}")
        return res
    t0 = time.time()
    video = load_video(cfg.video, cfg, family(model), progress=cfg.progress)
    t1 = time.time()
    prompt = build_prompt(model, processor, cfg.question, video, cfg.think)
    t2 = time.time()
    audio = f", {prompt.num_audio_tokens} audio tokens" if prompt.num_audio_tokens else ""
    print(f"{len(video.frames)} frames of {video.frames.shape[2]}x{video.frames.shape[1]} "
          f"({video.frames.nbytes / 2**20:.0f} MiB decoded) -> {prompt.num_video_tokens} video tokens{audio}, "
          f"prompt {len(prompt.input_ids)} tokens")
    kw = dict(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    if engine:
        out = engine.generate([prompt], **kw,
                              embeds=prompt_embeddings(model, [prompt]) if engine.prompt_embeds else None)[0]
    else:
        out = hf_generate(model, processor, [prompt], **kw)[0]
    t3 = time.time()
    print(out.text)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB
    print(f"seconds: decode + sample {t1 - t0:.1f}, processor {t2 - t1:.1f}, generate {t3 - t2:.1f} (vision tower, "
          f"prompt pass, {len(out.response_ids)} new tokens); peak RSS {peak:.2f} GiB")
    return out


if __name__ == "__main__":
    main(parse_config(RolloutConfig))
