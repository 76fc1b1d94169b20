"""
A stand-in for LongVILA-R1 / NVILA's remote code (NVlabs' modeling_vila.py), for the tests: data/tiny.py copies this
file into a tiny model's folder as modeling_vila.py, and AutoModel.from_pretrained(folder, trust_remote_code=True)
runs it, as it runs theirs. Written here (not their code), with the interface vlm.py relies on:
  - config.json: model_type "vila", auto_map -> modeling_vila.VILAConfig / VILAForCausalLM; llm_cfg,
    vision_tower_cfg, mm_projector_cfg; the weights in the subfolders llm/, vision_tower/, mm_projector/
  - VILAForCausalLM.from_pretrained(path) -> AutoConfig -> _from_config -> __init__ builds the parts from them
  - model.llm (a causal LM with the tokenizer in llm/), model.tokenizer (.media_tokens, .media_token_ids),
    model.vision_tower (.vision_tower = SiglipVisionModel, .image_processor), model.mm_projector (.layers),
    model.encoders["image" | "video"], model.pad_token_list, model.encode_images, model._embed
  - _embed as theirs behaves: pad/eos ids dropped from the prompt, each media token replaced by its encoder's rows
    (a video: every frame's projected patches, then the embedding of "\n"), left padding.
Sizes are tiny: SigLIP's patches, 2x2 neighbours concatenated by the projector (NVILA's mlp_downsample).
"""
import os
from collections import deque

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          SiglipImageProcessor, SiglipVisionModel)

IGNORE_INDEX = -100
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}


class VILAConfig(PretrainedConfig):
    model_type = "vila"

    def __init__(self, llm_cfg=None, vision_tower_cfg=None, mm_projector_cfg=None, hidden_size=None,
                 mm_hidden_size=None, mm_vision_select_layer=-2, mm_vision_select_feature="cls_patch",
                 num_video_frames=8, model_dtype="torch.float32", **kwargs):
        super().__init__(**kwargs)
        self.llm_cfg, self.vision_tower_cfg, self.mm_projector_cfg = llm_cfg, vision_tower_cfg, mm_projector_cfg
        self.hidden_size, self.mm_hidden_size = hidden_size, mm_hidden_size
        self.mm_vision_select_layer, self.mm_vision_select_feature = mm_vision_select_layer, mm_vision_select_feature
        self.num_video_frames, self.model_dtype = num_video_frames, model_dtype


class MultimodalProjectorConfig(PretrainedConfig):
    model_type = "v2l_projector"

    def __init__(self, mm_projector_type="mlp_downsample", mm_hidden_size=64, hidden_size=64, **kwargs):
        super().__init__(**kwargs)
        self.mm_projector_type, self.mm_hidden_size, self.hidden_size = mm_projector_type, mm_hidden_size, hidden_size


class DownSample2x2(nn.Module):
    """[B, side*side, C] -> [B, (side/2)^2, 4C]: each 2x2 block of patches concatenated (side even here)."""
    def forward(self, x):
        b, n, c = x.shape
        s = int(n ** 0.5)
        x = x.view(b, s // 2, 2, s // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (s // 2) ** 2, 4 * c)


class MultimodalProjector(PreTrainedModel):
    config_class = MultimodalProjectorConfig

    def __init__(self, config):
        super().__init__(config)
        c, h = config.mm_hidden_size, config.hidden_size
        self.layers = nn.Sequential(DownSample2x2(), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(),
                                    nn.Linear(h, h))
        self.post_init()

    def forward(self, x):
        return self.layers(x)


class SiglipVisionTower(nn.Module):
    """SigLIP with its image processor; features = hidden states of layer `mm_vision_select_layer`."""
    def __init__(self, path, config):
        super().__init__()
        self.vision_tower = SiglipVisionModel.from_pretrained(path, dtype=eval(config.model_dtype))
        self.image_processor = SiglipImageProcessor.from_pretrained(path)
        self.select_layer, self.select_feature = config.mm_vision_select_layer, config.mm_vision_select_feature

    def forward(self, images):
        p = next(self.vision_tower.parameters())
        out = self.vision_tower(images.to(p.device, p.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        feats = feats[:, 1:] if self.select_feature == "patch" else feats
        return feats.to(images.dtype)


class BasicImageEncoder(nn.Module):
    """An image -> its projected patches, then the embedding of `end_tokens`."""
    def __init__(self, parent, start_tokens=None, end_tokens="\n"):
        super().__init__()
        self._parent = [parent]  # a list: not a submodule (no cycle in modules())
        self.start_tokens, self.end_tokens = start_tokens, end_tokens  # start_tokens unused here (None, as theirs)

    def embed_tokens(self, tokens):
        parent = self._parent[0]
        ids = torch.tensor(parent.tokenizer(tokens).input_ids, device=parent.device)
        return parent.llm.model.embed_tokens(ids)

    def forward(self, images, config):
        feats = self._parent[0].encode_images(torch.stack(images))
        end = self.embed_tokens(self.end_tokens)
        return [torch.cat([f, end]) for f in feats]


class BasicVideoEncoder(BasicImageEncoder):
    """A video [F, 3, S, S] -> per frame: its projected patches, then the embedding of `end_tokens`; flattened."""
    def forward(self, videos, config):
        feats = self._parent[0].encode_images(torch.cat(videos)).split([len(v) for v in videos])
        end = self.embed_tokens(self.end_tokens)
        return [torch.cat([f, end[None].expand(len(f), -1, -1)], dim=1).flatten(0, 1) for f in feats]


class VILAForCausalLM(PreTrainedModel):
    config_class = VILAConfig
    main_input_name = "input_embeds"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config)
        root = config._name_or_path
        self.llm = AutoModelForCausalLM.from_pretrained(os.path.join(root, "llm"), dtype=eval(config.model_dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "llm"))
        self.tokenizer.padding_side = "left"
        self.tokenizer.media_tokens, self.tokenizer.media_token_ids = MEDIA_TOKENS, {}
        for name, token in MEDIA_TOKENS.items():
            self.tokenizer.add_tokens([token], special_tokens=True)
            self.tokenizer.media_token_ids[name] = self.tokenizer.convert_tokens_to_ids(token)
        self.llm.resize_token_embeddings(len(self.tokenizer))
        self.vision_tower = SiglipVisionTower(os.path.join(root, "vision_tower"), config)
        self.mm_projector = MultimodalProjector.from_pretrained(os.path.join(root, "mm_projector"))
        # as theirs: the third entry is a token *string* (tokenize, not an id), so it never matches an id
        self.pad_token_list = (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                               self.tokenizer.tokenize("<|endoftext|>")[0])
        self.encoders = {"image": BasicImageEncoder(self), "video": BasicVideoEncoder(self)}
        if kwargs.get("device_map", "auto") in ("auto", "cuda"):
            self.cuda()
        self.eval()

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        return cls._from_config(config, **kwargs)

    def encode_images(self, images):
        return self.mm_projector(self.vision_tower(images))

    def _embed(self, input_ids, media, media_config, labels, attention_mask):
        """(inputs_embeds [B, L', H], labels [B, L'], attention_mask [B, L']): text embeddings with the pad/eos
        tokens dropped and each media token replaced by its encoder's rows; left-padded to the longest."""
        labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        text = self.llm.model.embed_tokens(input_ids)
        rows = {name: deque(self.encoders[name](media[name], media_config.get(name, {}))) for name in (media or {})}
        media_of = {i: name for name, i in self.tokenizer.media_token_ids.items()}
        seqs, labs = [], []
        for k in range(len(input_ids)):
            parts, part_labels = [], []
            for pos in attention_mask[k].nonzero().flatten().tolist():
                t = int(input_ids[k, pos])
                if t in media_of:
                    r = rows[media_of[t]].popleft()
                    parts.append(r)
                    part_labels.append(torch.full((len(r),), IGNORE_INDEX, dtype=labels.dtype, device=labels.device))
                elif t not in self.pad_token_list:
                    parts.append(text[k, pos:pos + 1])
                    part_labels.append(labels[k, pos:pos + 1])
            seqs.append(torch.cat(parts))
            labs.append(torch.cat(part_labels))
        if any(rows.values()):
            raise ValueError("not all media embeddings were consumed")
        L = max(len(s) for s in seqs)
        embeds = text.new_zeros(len(seqs), L, text.shape[-1])
        out_labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        mask = torch.zeros(len(seqs), L, dtype=torch.bool, device=labels.device)
        for k, (s, lab) in enumerate(zip(seqs, labs)):
            embeds[k, L - len(s):], out_labels[k, L - len(s):], mask[k, L - len(s):] = s, lab, True
        return embeds, out_labels, mask

    def forward(self, input_ids=None, media=None, media_config=None, attention_mask=None, labels=None, **kwargs):
        embeds, labels, attention_mask = self._embed(input_ids, media, media_config or {}, labels, attention_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
