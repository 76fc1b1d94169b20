"""
The HF engine's fast decode step: a static KV cache, the decoder written out from the layers' weights, a CUDA graph.

rollout.hf_generate uses these on a GPU (its `static_cache`, `fused`, `compile_kernels`, `cuda_graph` switches;
README "Performance" measures each one). At batch 8 a decode step reads every weight once and does little
arithmetic, so its time is the number of kernels it launches and how well they stream the weights:
  StaticKV         a preallocated [layers, B, H_kv, max_len, D] cache with fixed addresses and fixed shapes, behind
                   an attention function of ours (works the same in every transformers 5.x)
  fused_forward    the decoder from the layers' weights: [Wq; Wk; Wv] and [W_gate; W_up] as one matmul each,
                   RMSNorm / residual + RMSNorm / rope / SiLU x up as one compiled kernel each; S = 1 is a decode
                   step (SDPA over the cache), S > 1 the prompt pass (causal SDPA, a mask for left padding)
  graphed_step     one decode step recorded as a CUDA graph and replayed: one launch per token
Tested on CPU against the model's own layers and transformers' DynamicCache (tests/test_fused_decode.py):
    python -m pytest tests/test_fused_decode.py -q
    python bench.py rollout --help                 # GPU: tokens/s of each variant beside generate()
"""
import functools

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlm import MROPE, family, text_model

class StaticKV:
    """A preallocated KV cache behind an attention function of our own (registered as `longrl_static_kv`).
    Every decode step has the same shapes (one query against the whole [B, H_kv, max_len, D] buffer, future and
    padded slots masked), so the step can be compiled and replayed as a CUDA graph; transformers' own cache
    classes are not involved, so this works the same in every transformers 5.x."""
    NAME = "longrl_static_kv"
    ROUND = 128  # the cache length is rounded up to a multiple of this: fewer distinct shapes to compile

    def __init__(self, model, valid: torch.Tensor):
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        B, n = valid.shape                # valid: [B, n] bool, False at left padding
        max_len = -(-n // self.ROUND) * self.ROUND  # the extra slots are never valid
        self.shape = (text.num_hidden_layers, B, text.num_key_value_heads, max_len, head_dim)
        self.k = self.v = None            # allocated at the first write, in the compute dtype
        self.valid = torch.nn.functional.pad(valid, (0, max_len - n))
        self.slots = torch.arange(max_len, device=valid.device)
        self.length = torch.zeros((), dtype=torch.long, device=valid.device)  # slots written so far

    def release(self):
        """Drop the buffers. The attention registry keeps `attend`, and so this object, until the next cache
        replaces it: without this the last rollout's cache (~10 GB for 8 samples of a 33k-token prompt in a 3B
        model) would sit on the GPU through the whole update."""
        self.k = self.v = None

    def write(self, layer: int, key, value):
        """Append key/value [B, H_kv, S, D] at the next S slots of `layer`. Given one row per prompt ([B / n, ...],
        the prompt pass), each row is written to its prompt's n sample rows."""
        if key.shape[0] != self.shape[1]:
            n = self.shape[1] // key.shape[0]
            key, value = key.repeat_interleave(n, dim=0), value.repeat_interleave(n, dim=0)
        if self.k is None:
            self.k, self.v = key.new_zeros(self.shape), value.new_zeros(self.shape)
            for buffer in (self.k, self.v, self.length):  # fixed addresses: the step can be a CUDA graph
                torch._dynamo.mark_static_address(buffer)
        slot = self.length + torch.arange(key.shape[2], device=key.device)
        self.k[layer].index_copy_(2, slot, key)
        self.v[layer].index_copy_(2, slot, value)

    def decode_mask(self, dtype=torch.float32):
        """[B, 1, 1, max_len] additive mask for a new token: 0 at written slots (this step's included) that are not
        padding, -inf elsewhere. Made once a step, in the query's dtype (SDPA would convert a boolean one per layer)."""
        allowed = (self.slots <= self.length)[None, :] & self.valid
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return mask[:, None, None]

    def decode(self, layer: int, query, scale: float, mask=None):
        """One new token's attention over every written, non-padding slot of `layer` (write it first).
        query [B, H, 1, D] -> [B, 1, H, D]: one SDPA call over the whole [B, H_kv, max_len, D] buffer, with the mask
        above and enable_gqa (the G = H / H_kv query heads that share a KV head read it once, no copy). On an H100
        it runs cuDNN's attention kernel, faster than the split-K matmuls + masked softmax we wrote before (README
        "Performance")."""
        mask = self.decode_mask(query.dtype) if mask is None else mask
        out = torch.nn.functional.scaled_dot_product_attention(query, self.k[layer], self.v[layer], attn_mask=mask,
                                                               scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers' attention interface, for decoding through the model's own layers."""
        self.write(module.layer_idx, key, value)
        # the prompt (its rows are the prompts, not the cache's P x n sample rows: also a prompt of one token):
        # plain SDPA over its own keys, with transformers' causal+padding mask
        if key.shape[2] > 1 or key.shape[0] != self.shape[1]:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0)
        return self.decode(module.layer_idx, query, scaling or query.shape[-1] ** -0.5), None


# ----------------------------------------------------------------------------------------------------------
# the fused decoder: the decoder from the layers' weights, ~14 kernels a layer instead of the ~40 that the
# model's own modules launch. Decoding a batch of 8 is bound by kernel count, not by FLOPs: the weights are read
# once a step either way, so fewer and fused kernels are what makes it fast. The prompt pass (compute-bound) runs
# through the same code: there the fused elementwise kernels save the memory traffic of eager RMSNorm / SiLU.

FUSED_LAYERS = ("Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer", "Qwen2_5OmniDecoderLayer", "Qwen2DecoderLayer",
                "LlamaDecoderLayer")  # pre-norm RMSNorm, rope'd q/k (+ optional q/k RMSNorm), SwiGLU MLP


def rms_norm(x, weight, eps: float):
    """transformers' RMSNorm: weight * (x / sqrt(mean(x^2) + eps)), the statistics in fp32."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x, residual, weight, eps: float):
    """The residual add and the next RMSNorm in one kernel (compiled): returns (x + residual, its norm)."""
    h = x + residual
    return h, rms_norm(h, weight, eps)


def rope_qk(q, k, cos, sin, q_norm=None, k_norm=None, eps: float = 0.0):
    """Rotary embedding of q [B, 1, H, D] and k [B, 1, H_kv, D]: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = (-x2, x1); Qwen3 first RMSNorms each head (q_norm / k_norm)."""
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotate(q), rotate(k)


def silu_mul(gate, up):
    """SwiGLU's middle: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


@functools.cache
def compiled_kernels():
    """The helpers above compiled once per process (a torch.compile wrapper made anew at every call would count
    as a recompile each time, and dynamo falls back to eager after a few). Batch and cache lengths change from
    call to call: the first change recompiles with that size symbolic (dynamo's automatic dynamic shapes)."""
    compiled = functools.partial(torch.compile, fullgraph=True)  # a size that changes becomes dynamic, once
    return tuple(map(compiled, (rms_norm, add_rms_norm, rope_qk, silu_mul)))


def fused_decoding(model) -> bool:
    """Whether fused_forward computes this model's decoder (else hf_generate decodes through its own layers)."""
    cfg = model.config.get_text_config()
    return (all(type(layer).__name__.removeprefix("FSDP") in FUSED_LAYERS for layer in text_model(model).layers)
            and cfg.hidden_act == "silu" and not getattr(cfg, "use_sliding_window", False))


def unshard_layers(model) -> list:
    """Under FSDP2 a decoder layer holds only its shard outside its own forward, and fused_forward reads the weights
    directly: gather every layer's full weights (all ranks together) until reshard() at the end of decoding.
    The root's own weights (embeddings, norm, lm_head) are gathered already: hf_generate runs inside its forward."""
    layers = [layer for layer in text_model(model).layers if hasattr(layer, "unshard")]
    for layer in layers:
        layer.unshard()
    return layers


def layer_weights(text, concat_weights: bool = True) -> list:
    """Per decoder layer, the tensors fused_forward multiplies by (the layers' own parameters, not copies, except
    the concatenations): with concat_weights [Wq; Wk; Wv] and [W_gate; W_up] as one matrix each (a temporary copy,
    ~60% of the decoder's size, freed when decoding ends), else kept apart."""
    def grouped(tensors):  # [W1; W2; ...] as one matrix (one matmul for all), or kept apart
        if tensors[0] is None:  # no biases
            return (None,) * (1 if concat_weights else len(tensors))
        return (torch.cat(tensors),) if concat_weights else tuple(tensors)
    layers = []
    for layer in text.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = [a.q_proj, a.k_proj, a.v_proj]
        qk_norm = getattr(a, "q_norm", None)  # Qwen3: RMSNorm over each head of q and k
        layers.append(dict(
            qkv=grouped([p.weight for p in qkv]), qkv_bias=grouped([p.bias for p in qkv]),
            sizes=[p.weight.shape[0] for p in qkv], o=a.o_proj.weight,
            q_norm=qk_norm.weight if qk_norm is not None else None,
            k_norm=a.k_norm.weight if qk_norm is not None else None,
            qk_eps=qk_norm.variance_epsilon if qk_norm is not None else 0.0,
            gate_up=grouped([m.gate_proj.weight, m.up_proj.weight]), down=m.down_proj.weight,
            norm1=layer.input_layernorm.weight, norm2=layer.post_attention_layernorm.weight,
            eps=layer.input_layernorm.variance_epsilon))
    return layers


def fused_forward(model, kv: StaticKV, compile_kernels: bool = False, concat_weights: bool = True):
    """forward(h [B, S, hidden] input embeddings, positions [3, B, S], prompt_mask=None) -> final-normed hidden
    [B, S, hidden], writing K/V into `kv` and advancing it by S: the same function as the model's decoder, written
    out from the layers' weights (layer_weights). S = 1 is a decode step (attention over the cache); S > 1 is the
    prompt pass (causal SDPA over its own keys, prompt_mask for left padding). compile_kernels fuses each
    elementwise helper above into one kernel (torch.compile, once per process: compiled_kernels); concat_weights
    multiplies x by [Wq; Wk; Wv] and by [W_gate; W_up] in one matmul each."""
    text = text_model(model)
    F = torch.nn.functional
    if compile_kernels:
        norm, add_norm, rope, swiglu = compiled_kernels()
    else:
        norm, add_norm, rope, swiglu = rms_norm, add_rms_norm, rope_qk, silu_mul
    attn0 = text.layers[0].self_attn
    D, scale = attn0.head_dim, attn0.scaling
    layers = layer_weights(text, concat_weights)
    final_norm, final_eps = text.norm.weight, text.norm.variance_epsilon
    mrope = family(model) in MROPE

    def project(x, weights, biases, sizes=None):  # one matmul then split, or one matmul per weight
        if len(weights) == 1:
            y = F.linear(x, weights[0], biases[0])
            return y.split(sizes, dim=-1) if sizes else y.chunk(2, dim=-1)
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]

    def forward(h, positions, prompt_mask=None):
        B, S = h.shape[:2]
        cos, sin = text.rotary_emb(h, positions if mrope else positions[0])  # transformers 5.17+: [B, S, D]
        if cos.dim() == 4:  # per-axis angles [3, B, S, D] (older transformers): equal rows only for a text token
            if S > 1:
                raise ValueError("this transformers returns rope angles per axis ([3, B, S, D]); the fused prompt "
                                 "pass needs them combined, as transformers 5.17+ does")
            cos, sin = cos[0], sin[0]
        cos, sin = cos[:, :, None], sin[:, :, None]                          # [B, S, 1, D] against [B, S, heads, D]
        x = norm(h, layers[0]["norm1"], layers[0]["eps"])
        decode = S == 1 and B == kv.shape[1]  # else the prompt pass (P rows, not P x n: also 1-token prompts)
        mask = kv.decode_mask(h.dtype) if decode else prompt_mask            # the same for every layer
        for i, w in enumerate(layers):
            q, k, v = project(x, w["qkv"], w["qkv_bias"], w["sizes"])
            q, k = rope(q.view(B, S, -1, D), k.view(B, S, -1, D), cos, sin, w["q_norm"], w["k_norm"], w["qk_eps"])
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, S, -1, D).transpose(1, 2)  # [B, heads, S, D]
            kv.write(i, k, v)
            if decode:
                att = kv.decode(i, q, scale, mask)                           # [B, 1, H, D]
            else:  # the prompt's own keys: causal (cuDNN / flash kernels), or causal + padding with a mask
                att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                     enable_gqa=True).transpose(1, 2)
            o = F.linear(att.reshape(B, S, -1), w["o"])
            h, x = add_norm(o, h, w["norm2"], w["eps"])                      # h += attention; x = norm(h)
            gate, up = project(x, w["gate_up"], (None,) * len(w["gate_up"]))
            mlp = F.linear(swiglu(gate, up), w["down"])
            last = i == len(layers) - 1                                      # h += mlp; x = next layer's norm(h)
            h, x = add_norm(mlp, h, final_norm if last else layers[i + 1]["norm1"],
                            final_eps if last else layers[i + 1]["eps"])
        kv.length += S
        return x
    return forward


def padded_prompt_mask(valid):
    """[B, 1, S, S] boolean mask of a left-padded prompt pass: causal, padding keys masked. A padding position
    sees itself (a row with nothing to attend to gives NaNs, which would reach the cache as its K/V)."""
    S = valid.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
    return (causal & valid[:, None, :] | torch.eye(S, dtype=torch.bool, device=valid.device))[:, None]


def graphed_step(step, kv: StaticKV, tok, step_pos):
    """`step` recorded once as a CUDA graph; the returned function copies its inputs into the recorded buffers and
    replays it. Works because every address is fixed (StaticKV) and nothing in the step waits for the CPU. A step
    that cannot be recorded falls back to running eagerly, and says so."""
    tok, step_pos = tok.clone(), step_pos.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # one eager run first: lazy initialisation and allocations happen here
            step(tok, step_pos)
        torch.cuda.current_stream().wait_stream(stream)
        kv.length -= 1                   # that run wrote a throw-away slot; the first real step overwrites it
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hidden = step(tok, step_pos)
    except RuntimeError as e:
        print(f"CUDA graph capture failed ({str(e).splitlines()[0][:120]}): decoding eagerly")
        torch.cuda.synchronize()
        return step

    def replay(new_tok, new_pos):
        tok.copy_(new_tok)
        step_pos.copy_(new_pos)
        graph.replay()                   # also advances kv.length, as recorded
        return hidden
    replay.step = step  # the graph reads what the step holds (fused_forward's weights): keep it alive with the graph
    return replay
