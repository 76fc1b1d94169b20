"""
Sequence parallelism (DeepSpeed-Ulysses) for long videos: each of the P ranks of an SP group holds S/P tokens.

    (B,H,S/P,D) -a2a-> (B,H/P,S,D) -attn-> (B,H/P,S,D) -a2a-> (B,H,S/P,D)

Attention is the only layer that mixes tokens: an all-to-all trades the sequence split for a head split, each rank
attends over the whole sequence with H/P heads, and a second all-to-all trades back. MLPs, norms and rope (3-D
positions computed on the full sequence, then sliced) work per token. Re-creates Long-RL's MR-SP
(verl/utils/ulysses.py, verl/workers/actor/dp_actor.py:96-179) with no globals and no patched forwards: the
attention is registered under a new name in transformers' AttentionInterface, with the group bound by partial.
  stage 1: each rank encodes 1/P of every video's temporal patch groups, then gathers: parallel_video_features()
  stage 2: the right-padded batch is padded to a multiple of P and cut into P slices: shard_sequence()
Rules: query heads % P == 0 (check_heads); no attention mask (right padding + causal is exact for real tokens);
every SP rank runs forward AND backward (the all-to-alls are collectives in both); the data loader shards by
dp_rank, so the P peers of an SP group read the same samples; `group=None` means no SP, never the world group.

One SP micro-batch (tests/test_sp.py runs exactly this):
    sp = init_sp(sp_size); register_ulysses(sp.sp_group)
    model.set_attn_implementation({"text_config": "ulysses", "vision_config": "sdpa"})
    feats = parallel_video_features(model, pixel_values_videos, video_grid_thw, sp.sp_group)
    sh = shard_sequence(ids, pos, response_mask, sp.sp_rank, sp.sp_size, pad_id, video_token_id)
    h = model.model(input_ids=sh.input_ids, position_ids=sh.position_ids, use_cache=False,
                    mm_encoder_outputs={"video": slice_video_features(feats, sh.video_rows)}).last_hidden_state
    logp = log_softmax(lm_head(h[sh.loss_mask]))[sh.labels]; loss = sum over local tokens / N_global; backward
"""
import math
import pickle
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from common import all_reduce
from vlm import (FRAMES, add_audio_features, decoder_hidden, encode_videos, family, group_attention_mask,
                 group_block_mask, group_flex_attention, input_embeddings, media_model, media_token_id, output_head,
                 select_videos, token_logprobs, video_features)

def _size(group):
    return 1 if group is None else dist.get_world_size(group)


def _rank(group):
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------- the all-to-all core
def all_to_all(x, scatter_dim, gather_dim, group):
    """Chunk i of x (split along scatter_dim) goes to rank i; the chunks received are concatenated along gather_dim."""
    P = _size(group)
    if P == 1:
        return x
    send = [c.contiguous() for c in x.chunk(P, dim=scatter_dim)]
    recv = [torch.empty_like(c) for c in send]
    dist.all_to_all(recv, send, group=group)
    return torch.cat(recv, dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """all_to_all with autograd: the backward is the reverse exchange (scatter what was gathered and vice versa)."""
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.dims[1], ctx.dims[0], ctx.group), None, None, None


def check_heads(num_heads, num_kv_heads, sp_size):
    """Raise unless query heads % SP == 0; return how often to repeat each kv head so that every rank gets the kv
    heads of exactly its H/P query heads: P/gcd(kv, P) times (1 if P | kv, P/kv if kv | P; always whole GQA groups)."""
    if num_heads % sp_size:
        valid = ", ".join(str(p) for p in range(1, num_heads + 1) if num_heads % p == 0)
        raise ValueError(f"SP={sp_size}: Ulysses splits the {num_heads} query heads over the SP ranks, "
                         f"so SP must be one of {valid}")
    return sp_size // math.gcd(num_kv_heads, sp_size)


def ulysses_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, group, **kwargs):
    """transformers attention function. q (B,H,S/P,D), k/v (B,Hkv,S/P,D) not yet GQA-repeated -> ((B,S/P,H,D), None).
    attention_mask: None (right-padded rows: is_causal alone keeps real tokens from seeing pads; ulysses_mask
    refuses a 2-D mask that would hide something), or the FULL-length mask of packed groups (B,1,S,S), applied
    after the all-to-all, where each rank holds the whole sequence for its heads (vlm.PackedGroups)."""
    full_mask = attention_mask is not None and tuple(attention_mask.shape[-2:]) == (query.shape[2] * _size(group),) * 2
    assert attention_mask is None or full_mask, "ulysses attention takes no mask or a full-length (B,1,S,S) one"
    assert kwargs.get("sliding_window") is None, "sliding-window attention is not supported under Ulysses"
    rep = check_heads(query.shape[1], key.shape[1], _size(group))
    if rep > 1:  # e.g. 2 kv heads, P=4: copy each kv head twice so that every rank gets one whole GQA group
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    q, k, v = (AllToAll.apply(x, 1, 2, group) for x in (query, key, value))  # (B,H,S/P,D) -> (B,H/P,S,D)
    gqa = k.shape[1] != q.shape[1]
    if isinstance(attention_mask, BlockMask):  # packed groups on the GPU: FlexAttention over the block mask
        out, _ = group_flex_attention(module, q, k, v, attention_mask, scaling)  # (B,S,H/P,D)
        out = out.transpose(1, 2)                                                 # (B,H/P,S,D)
    elif attention_mask is not None:  # packed groups, the dense reference mask (CPU)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                             enable_gqa=gqa)                      # (B,H/P,S,D)
    else:  # on CUDA in bf16, causal with no mask, SDPA can take its FlashAttention kernel (GQA included)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)                      # (B,H/P,S,D)
    out = AllToAll.apply(out, 2, 1, group)  # (B,H/P,S,D) -> (B,H,S/P,D)
    return out.transpose(1, 2).contiguous(), None  # (B,S/P,H,D), as transformers expects


def ulysses_mask(*args, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: always None (causal via is_causal). Registered so that a 2-D padding mask
    cannot be dropped silently (unregistered names get None, masking_utils.py:830): one that hides a token raises."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("ulysses attention supports right-padded causal batches only: pass attention_mask=None")
    return None


def register_ulysses(group, name="ulysses"):
    """Register ulysses_attention (bound to `group`) under `name` for model.set_attn_implementation. The name must
    not contain "flash": transformers would try to load a flash kernel for it (and give the vision tower varlen)."""
    assert "flash" not in name, name
    AttentionInterface.register(name, partial(ulysses_attention, group=group))
    AttentionMaskInterface.register(name, ulysses_mask)
    return name


# ----------------------------------------------------------------------------- process groups
@dataclass
class SPInfo:
    sp_group: object = None  # None: no SP
    dp_group: object = None
    sp_rank: int = 0
    sp_size: int = 1
    dp_rank: int = 0  # shard the data by this: the SP peers of a group must see the same samples
    dp_size: int = 1


def init_sp(sp_size):
    """world = dp x sp; SP groups are runs of consecutive ranks (stay inside a node), DP groups stride by sp."""
    if not dist.is_initialized():
        assert sp_size == 1, "sp_size > 1 needs torch.distributed initialised (torchrun)"
        return SPInfo()
    world, rank = dist.get_world_size(), dist.get_rank()
    assert world % sp_size == 0, f"world size {world} is not a multiple of sp_size {sp_size}"
    sp_group = dp_group = None
    for d in range(world // sp_size):  # every rank creates every group, in the same order (new_group is collective)
        g = dist.new_group(list(range(d * sp_size, (d + 1) * sp_size)))
        sp_group = g if rank // sp_size == d else sp_group
    for s in range(sp_size):
        g = dist.new_group(list(range(s, world, sp_size)))
        dp_group = g if rank % sp_size == s else dp_group
    return SPInfo(sp_group, dp_group, rank % sp_size, sp_size, rank // sp_size, world // sp_size)


def dp_all_reduce(t: torch.Tensor, spi=None, op=None):
    """Sum over data-parallel ranks only: the SP peers of a group hold the same sequences and must not be
    counted twice."""
    if spi is None or spi.sp_size == 1:
        return all_reduce(t, None, op)
    return all_reduce(t, spi.dp_group, op) if spi.dp_size > 1 else t


def sp_broadcast(t: torch.Tensor, spi=None) -> torch.Tensor:
    """t as the SP group's first rank holds it, on every peer (in place): for values the peers compute each on
    their own that must agree (rewards, when a judge call can fail on one peer only)."""
    if spi is None or spi.sp_size == 1:
        return t
    buf = t if dist.get_backend(spi.sp_group) == "gloo" else t.to(torch.cuda.current_device())
    dist.broadcast(buf, group=spi.sp_group, group_src=0)
    return t.copy_(buf)


# ----------------------------------------------------------------------------- stage 2: slicing the sequence
def shard_values(x, sp_rank, sp_size, pad_value=0, shift=False):
    """Pad the last dim (S) to a multiple of sp_size, optionally shift left by one (value of t+1 at t), slice."""
    if shift:
        x = torch.cat([x[..., 1:], x.new_full((*x.shape[:-1], 1), pad_value)], dim=-1)
    n = -(-x.shape[-1] // sp_size)  # S/P, rounded up
    x = torch.cat([x, x.new_full((*x.shape[:-1], n * sp_size - x.shape[-1]), pad_value)], dim=-1)
    return x[..., sp_rank * n:(sp_rank + 1) * n]


@dataclass
class Shard:
    input_ids: torch.Tensor     # (B,S/P)
    position_ids: torch.Tensor  # (3,B,S/P) slice of the full 3-D rope positions
    labels: torch.Tensor        # (B,S/P) token t+1 of the FULL sequence
    loss_mask: torch.Tensor     # (B,S/P) bool, True where labels is a response token
    video_rows: torch.Tensor    # rows of cat(video features) for the video tokens here, in (batch, position) order
    audio_rows: torch.Tensor = None  # the same for audio tokens (Omni), None without audio


def shard_sequence(input_ids, position_ids, response_mask, sp_rank, sp_size, pad_id, video_token_id,
                   audio_token_id=None):
    """This rank's slice of a right-padded batch; response_mask (B,S) marks the tokens to score.
        S=10, P=3 -> padded to 12, 4 tokens a rank:
        tokens : t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 pd pd
        labels : t1 t2 t3 t4 | t5 t6 t7 t8 | t9 pd pd pd    shifted BEFORE slicing: rank 0's last label is t4
        rank   : 0           | 1           | 2
    Pads get no loss and, being last, are never attended to by real tokens (causal). video_rows (audio_rows)
    are the feature rows of the video (audio) placeholder tokens this rank holds."""
    def rows_of(token):  # feature row of each placeholder token, (b, s) order, restricted to this rank's slice
        is_media = input_ids == token
        rows = is_media.flatten().cumsum(0).view_as(is_media) - 1
        return shard_values(rows, sp_rank, sp_size)[shard_values(is_media, sp_rank, sp_size, False)]
    return Shard(input_ids=shard_values(input_ids, sp_rank, sp_size, pad_id),
                 position_ids=shard_values(position_ids, sp_rank, sp_size, 0),
                 labels=shard_values(input_ids, sp_rank, sp_size, pad_id, shift=True),
                 loss_mask=shard_values(response_mask.bool(), sp_rank, sp_size, False, shift=True),
                 video_rows=rows_of(video_token_id),
                 audio_rows=None if audio_token_id is None else rows_of(audio_token_id))


def slice_video_features(feats, rows, audio_rows=None):
    """get_video_features output restricted to `rows` (Shard.video_rows); DeepStack features sliced alike, and
    Omni's audio features by `audio_rows`. Zero rows is fine: pass it anyway, it keeps stage 1's gather in every
    rank's backward graph."""
    kw = {"pooler_output": (torch.cat(feats.pooler_output)[rows],)}
    if getattr(feats, "deepstack_features", None) is not None:  # Qwen3-VL: one tuple per DeepStack layer
        kw["deepstack_features"] = [(torch.cat(f)[rows],) for f in feats.deepstack_features]
    out = type(feats)(**kw)
    if getattr(feats, "audio_features", None) is not None:
        out.audio_features = (torch.cat(feats.audio_features)[audio_rows],)
    return out


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        n = grad.shape[-1] // _size(ctx.group)
        return grad[..., _rank(ctx.group) * n:(_rank(ctx.group) + 1) * n], None


def gather_token_values(x_local, group):
    """(B,S/P) per-token values (log-probs, entropies) -> (B,S padded). Backward keeps this rank's slice of the grad:
    right when every rank computes the same loss from the gathered values. train_grpo.py does not need it for the
    loss (each token counts once, on the rank that holds it); use it for logging and storing old log-probs."""
    return x_local if _size(group) == 1 else _GatherTokens.apply(x_local, group)


# ----------------------------------------------------------------------------- gathers in chunks
def _all_sizes(n, group, device):
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(_size(group))]
    dist.all_gather(sizes, torch.tensor([n], device=device), group=group)
    return [int(s) for s in sizes]


def chunked_all_gather(tensor, num_chunks, group):
    """cat of every rank's tensor along dim 0 (row counts may differ), gathered num_chunks row-pieces at a time into
    one preallocated output: the extra memory is P x one piece, not P x tensor."""
    P = _size(group)
    if P == 1:
        return tensor
    sizes = _all_sizes(tensor.shape[0], group, tensor.device)
    starts, step = [sum(sizes[:q]) for q in range(P)], max(1, -(-max(sizes) // num_chunks))
    out = tensor.new_empty(sum(sizes), *tensor.shape[1:])
    for lo in range(0, max(sizes), step):
        piece = tensor[lo:lo + step]  # pad short pieces: every rank must send the same shape
        piece = torch.cat([piece, piece.new_zeros(step - piece.shape[0], *piece.shape[1:])]).contiguous()
        bufs = [torch.empty_like(piece) for _ in range(P)]
        dist.all_gather(bufs, piece, group=group)
        for q in range(P):
            n = max(0, min(step, sizes[q] - lo))
            out[starts[q] + lo:starts[q] + lo + n] = bufs[q][:n]
    return out


def chunked_all_gather_object(obj, num_chunks, group):
    """all_gather_object for large CPU-side objects (e.g. thousands of frames): pickle, gather the bytes in chunks."""
    if _size(group) == 1:
        return [obj]
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"  # NCCL moves CUDA tensors only
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    sizes = _all_sizes(data.numel(), group, device)
    full = chunked_all_gather(data, num_chunks, group).cpu()
    return [pickle.loads(b.numpy().tobytes()) for b in full.split(sizes)]


# ----------------------------------------------------------------------------- stage 1: parallel vision encoding
class _GatherRows(torch.autograd.Function):
    """Forward: chunked all-gather of each rank's feature rows. Backward: every rank's loss used every rank's rows,
    so the grad of this rank's rows is the SUM over ranks of the grad of the gathered tensor, sliced to them."""
    @staticmethod
    def forward(ctx, x, group, num_chunks):
        ctx.group, ctx.sizes = group, _all_sizes(x.shape[0], group, x.device)
        return chunked_all_gather(x, num_chunks, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[:_rank(ctx.group)])
        return grad[start:start + ctx.sizes[_rank(ctx.group)]], None, None


def parallel_video_features(model, pixel_values_videos, video_grid_thw, group, num_chunks=1):
    """vlm.video_features(model, pix, grid), computed with each rank encoding a contiguous 1/P of every
    video's temporal patch groups (h*w patch rows each; its own grid (t_r,h,w); uneven splits, zero allowed)."""
    P, r = _size(group), _rank(group)
    if P == 1:
        return video_features(model, pixel_values_videos, video_grid_thw)
    m2 = media_model(model).visual.spatial_merge_size ** 2  # merger rows per temporal group = h*w/m2
    pix, grid, counts, offset = [], [], [], 0  # counts[v][q]: feature rows of video v encoded by rank q
    for t, h, w in video_grid_thw.tolist():
        cut = [t * q // P for q in range(P + 1)]  # rank q encodes temporal groups cut[q]:cut[q+1]
        counts.append([(cut[q + 1] - cut[q]) * h * w // m2 for q in range(P)])
        if cut[r + 1] > cut[r]:
            pix.append(pixel_values_videos[offset + cut[r] * h * w:offset + cut[r + 1] * h * w])
            grid.append([cut[r + 1] - cut[r], h, w])
        offset += t * h * w
    keep = bool(grid)
    if not keep:  # no share: still run the tower on one group (FSDP needs every rank in every module), keep 0 rows
        t, h, w = video_grid_thw[0].tolist()
        pix, grid = [pixel_values_videos[:h * w]], [[1, h, w]]
    out = video_features(model, torch.cat(pix), torch.tensor(grid, device=video_grid_thw.device))
    deep = getattr(out, "deepstack_features", None) or []
    local = torch.cat([torch.cat(out.pooler_output)] + [torch.cat(d) for d in deep], dim=-1)  # (rows, C*(1+L))
    full = _GatherRows.apply(local if keep else local[:0], group, num_chunks)  # rank-major rows
    V = len(counts)
    pieces = full.split([counts[v][q] for q in range(P) for v in range(V)])
    per_video = [torch.cat([pieces[q * V + v] for q in range(P)]).chunk(1 + len(deep), dim=-1) for v in range(V)]
    kw = {"pooler_output": tuple(pv[0] for pv in per_video)}
    if deep:
        kw["deepstack_features"] = [tuple(pv[1 + i] for pv in per_video) for i in range(len(deep))]
    return type(out)(**kw)


# ----------------------------------------------------------------------------- the SP side of response log-probs
@dataclass
class TokenSplit:
    """Which response tokens of a packed micro-batch this rank scored, and how to move per-token values between
    "every response token, flat in sequence order" (what a Seq stores) and "this rank's tokens" (what its loss
    sees). Without SP (spi None or sp_size 1) both directions are the identity."""
    response_mask: torch.Tensor = None  # (B,S) True at the positions that predict a response token (Packed)
    local_mask: torch.Tensor = None     # (B,S/P) this rank's scored positions (Shard.loss_mask)
    spi: SPInfo = None

    def align(self, values, device):
        """flat per-token values of every response token -> this rank's entries, in its log-probs' order."""
        if self.spi is None:
            return values.to(device)
        full = torch.zeros(self.response_mask.shape, dtype=values.dtype)        # (B,S)
        full[self.response_mask] = values.cpu()
        mine = shard_values(full, self.spi.sp_rank, self.spi.sp_size, 0)        # (B,S/P)
        return mine[self.local_mask].to(device)

    def gather(self, local):
        """this rank's values -> every response token's, flat in sequence order (on every SP peer)."""
        if self.spi is None:
            return local
        mine = torch.zeros(self.local_mask.shape, dtype=local.dtype, device=local.device)
        mine[self.local_mask.to(local.device)] = local                          # (B,S/P)
        full = gather_token_values(mine, self.spi.sp_group)[:, :self.response_mask.shape[1]]   # (B,S)
        return full[self.response_mask.to(full.device)]


def sp_video_features(model, prompts, spi):
    """Stage 1: the media features of `prompts` (one entry each), the video tower split over the SP ranks.
    Embeddings cache: no tower to split (SP peers share prompts, so all take this branch); LLaVA's and VILA's image
    towers run whole on every SP rank; Omni's audio encoder too, beside the split video tower."""
    if any(p.video_features is not None for p in prompts) or family(model) in FRAMES:
        return encode_videos(model, prompts)
    dev = output_head(model).weight.device
    pix = torch.cat([p.pixel_values_videos for p in prompts]).to(dev)
    grid = torch.cat([p.video_grid_thw for p in prompts]).to(dev)
    return add_audio_features(model, prompts, parallel_video_features(model, pix, grid, spi.sp_group))


def sp_response_logprobs(model, prompts, where, packed, spi, suppress_ids, temperature, chunk, with_entropy,
                         vision_grad):
    """vlm.response_logprobs under Ulysses SP: stage 1 encodes 1/P of every video here (parallel_video_features),
    stage 2 runs the decoder on this rank's slice of the packed batch (shard_sequence) and scores the response
    tokens it holds. Returns (logp, entropy, TokenSplit) for those tokens."""
    dev = output_head(model).weight.device
    with torch.set_grad_enabled(vision_grad):
        feats = select_videos(sp_video_features(model, prompts, spi), where)
    tokens_mask = torch.zeros_like(packed.response_mask)  # token-aligned: the response tokens themselves
    tokens_mask[:, 1:] = packed.response_mask[:, :-1]
    sh = shard_sequence(packed.input_ids, packed.positions, tokens_mask, spi.sp_rank, spi.sp_size, 0,
                        media_token_id(model), getattr(model.config, "audio_token_id", None))
    hidden, _ = decoder_hidden(model, sh.input_ids.to(dev), sh.position_ids.to(dev),
                               slice_video_features(feats, sh.video_rows, sh.audio_rows))
    mask = sh.loss_mask.to(dev)
    logp, ent = token_logprobs(model, hidden[mask], sh.labels.to(dev)[mask], suppress_ids, temperature, chunk,
                               with_entropy)
    return logp, ent, TokenSplit(packed.response_mask, sh.loss_mask, spi)


@dataclass
class RowSplit:
    """TokenSplit's counterpart for packed groups (vlm.PackedGroups): response token i is predicted at hidden row
    pred_rows[i] of the [G, S] rows; this rank holds positions [r * n, (r + 1) * n) of every row, so it scores
    the tokens `owned` (ascending indices into the N response tokens). Same align / gather interface."""
    owned: torch.Tensor             # [N_local] indices into the flat N response tokens
    total: int                      # N
    spi: SPInfo = None

    def align(self, values, device):
        """flat per-token values of every response token -> this rank's entries, in its log-probs' order."""
        return values.cpu()[self.owned].to(device)

    def gather(self, local):
        """this rank's values -> every response token's (on every SP peer): each token has one owner, so a sum
        over the SP group assembles them. No gradient (used for stored and logged values)."""
        full = torch.zeros(self.total, dtype=local.dtype, device=local.device)
        full[self.owned.to(local.device)] = local.detach()
        dist.all_reduce(full, group=self.spi.sp_group)
        return full


def sp_group_logprobs(model, prompts, groups, spi, suppress_ids, temperature, chunk, with_entropy, vision_grad):
    """vlm.group_logprobs under Ulysses SP: the videos encoded once per row (sp_video_features), each packed row
    [prompt | responses] sliced over the SP ranks (shard_sequence), the group mask for the FULL row given to
    ulysses_attention (applied after its all-to-all), and each rank scoring the response tokens whose predicting
    row it holds. Returns (logp, entropy, RowSplit)."""
    dev = output_head(model).weight.device
    with torch.set_grad_enabled(vision_grad):
        feats = sp_video_features(model, prompts, spi)                        # one per row: no repeats
    G, S = groups.input_ids.shape
    n = -(-S // spi.sp_size)                                                  # S/P, rounded up
    sh = shard_sequence(groups.input_ids, groups.positions, torch.zeros(G, S, dtype=torch.bool), spi.sp_rank,
                        spi.sp_size, 0, media_token_id(model), getattr(model.config, "audio_token_id", None))
    segments = torch.cat([groups.segments, groups.segments.new_full((G, n * spi.sp_size - S), -1)], dim=1)
    mask = group_block_mask(segments, dev) if dev.type == "cuda" else \
        group_attention_mask(segments, input_embeddings(model).weight.dtype).to(dev)      # (G,1,S,S): full rows
    hidden, _ = decoder_hidden(model, sh.input_ids.to(dev), sh.position_ids.to(dev),
                               slice_video_features(feats, sh.video_rows, sh.audio_rows), attention_mask=mask)
    row, pos = groups.pred_rows // S, groups.pred_rows % S                   # where each token is predicted
    owned = (pos // n == spi.sp_rank).nonzero()[:, 0]
    local = row[owned] * n + pos[owned] - spi.sp_rank * n                    # into this rank's (G, n) rows
    logp, ent = token_logprobs(model, hidden.flatten(0, 1)[local.to(dev)], groups.labels[owned].to(dev),
                               suppress_ids, temperature, chunk, with_entropy)
    return logp, ent, RowSplit(owned, len(groups.labels), spi)

