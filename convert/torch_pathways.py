"""IConFace's side pathways in PyTorch, and its full velocity on a diffusers FLUX.2 transformer.

A PyTorch reference of `iconface_jax.models.iconface.IConFace.__call__` for the files written by
`python -m convert.export` (needs only torch, and `safetensors` for `IConFaceSide.from_file`):

    from diffusers import Flux2Transformer2DModel
    from convert.torch_pathways import IConFaceSide, iconface_velocity
    transformer = Flux2Transformer2DModel.from_pretrained("FLUX.2-klein-base-4B", subfolder="transformer")
    transformer.load_lora_adapter("export/pytorch_lora_weights.safetensors")
    side = IConFaceSide.from_file("export/iconface_side.safetensors")
    v = iconface_velocity(transformer, side, scene, degraded, references, text, sigma, e_id, grid=(32, 32))

Tokens are the packed, normalised 128-channel latents of `Flux2KleinPipeline` (scene (B, h*w, C),
degraded (B, h*w, C), references (B, R, h*w, C) with R >= 0); text (B, T, joint_dim) are the prompt
embeddings (`side.prompt_embeds`, `side.negative_prompt_embeds`); sigma (B,) in [0, 1]; e_id (B, 512) the
unit identity anchor (`identity_anchor`). The returned scene velocity drops into a flow-match Euler
sampler as diffusers' transformer output does. Side pathways and inputs must share the transformer's
dtype (`side.to(torch.bfloat16)` for a bf16 transformer); the parity tests run float32. A model
trained with `reference_cache` runs as diffusers' Flux2 KV "extract" pass (its KV attention processors
are set on the transformer; they equal the plain ones without KV arguments).
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

# The paper's Table 3 rows: (input residual, identity modulation, memory routes), as in iconface.py.
VARIANTS = {"concat": (False, False, 0), "struct": (True, False, 0), "id": (True, True, 0),
            "one_route": (True, True, 1), "full": (True, True, 2)}


def identity_anchor(ref_embeddings: torch.Tensor, degraded_embedding: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """e_id (B, 512) from raw AdaFace features: softmax(log ||z_r|| / T)-weighted unit references
    (B, R, 512), or the degraded image's direction when R = 0."""
    if ref_embeddings.shape[1] == 0:
        return F.normalize(degraded_embedding.float(), dim=-1)
    z = ref_embeddings.float()
    q = z.norm(dim=-1)
    w = torch.softmax(torch.log(q) / temperature, dim=-1)
    return F.normalize(torch.einsum("br,brd->bd", w, z / q[..., None]), dim=-1)


def image_ids(t: int, grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, 4) RoPE ids (t, h, w, 0) of one image segment, row-major."""
    h, w = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([torch.full_like(h, t), h, w, torch.zeros_like(h)], -1).reshape(-1, 4)


def text_ids(length: int) -> torch.Tensor:
    """(length, 4) RoPE ids (0, 0, 0, l) of the text tokens."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


def smooth(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """3x3 binomial blur ([1, 2, 1] / 4 per axis, edges replicated) of (B, h*w, C) tokens on their grid."""
    b, _, c = tokens.shape
    x = tokens.reshape(b, *grid, c)
    for axis in (1, 2):
        n = x.shape[axis]
        p = torch.cat([x.narrow(axis, 0, 1), x, x.narrow(axis, n - 1, 1)], dim=axis)
        x = (p.narrow(axis, 0, n) + 2 * p.narrow(axis, 1, n) + p.narrow(axis, 2, n)) / 4
    return x.reshape(b, -1, c)


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, h*w, C) tokens (antialiased when shrinking, as `jax.image.resize`)."""
    if tuple(grid) == tuple(to):
        return tokens
    b, _, c = tokens.shape
    x = tokens.reshape(b, *grid, c).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(to), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).reshape(b, -1, c).to(tokens.dtype)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention of (B, L, heads*d) inputs, (B, Lq, heads*d) out."""
    split = lambda y: y.reshape(*y.shape[:2], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


class Pooler(nn.Module):
    """Learned-query attention pooling of LayerNorm(x) (B, L, D) into (B, N, memory_dim)."""

    def __init__(self, dim: int, memory_dim: int, num_queries: int, heads: int):
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.zeros(num_queries, memory_dim))
        self.to_k = nn.Linear(dim, memory_dim, bias=False)
        self.to_v = nn.Linear(dim, memory_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        q = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        return _attention(q, self.to_k(x), self.to_v(x), self.heads)


class MemoryCrossAttention(nn.Module):
    """h + gamma * to_out(Attn(Q LayerNorm(h), K M, V M)) with low-rank Q, K, V."""

    def __init__(self, dim: int, memory_dim: int, rank: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, rank, bias=False)
        self.to_k = nn.Linear(memory_dim, rank, bias=False)
        self.to_v = nn.Linear(memory_dim, rank, bias=False)
        self.to_out = nn.Linear(rank, dim, bias=False)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.to_q(F.layer_norm(h, h.shape[-1:], eps=1e-6))
        out = self.to_out(_attention(q, self.to_k(memory), self.to_v(memory), self.heads))
        return h + self.gamma * out


class IdentityPathway(nn.Module):
    """e_id -> silu(phi_global(e_id)) -> (Delta_dbl (B, 6D), Delta_sgl (B, 3D))."""

    def __init__(self, dim: int, id_dim: int):
        super().__init__()
        self.phi_global = nn.Linear(id_dim, dim)
        self.psi_dbl = nn.Linear(dim, 6 * dim, bias=False)
        self.psi_sgl = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, e_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.phi_global(e_id))
        return self.psi_dbl(h), self.psi_sgl(h)


class StructurePathway(nn.Module):
    """The low-rank degraded-to-scene residual W_in and the pooled degraded memory (one or two routes)."""

    def __init__(self, dim: int, cfg: dict):
        super().__init__()
        variant_residual, _, routes = VARIANTS[cfg["variant"]]
        self.scale = cfg["residual_scale"]
        if variant_residual:
            self.w_in_down = nn.Linear(dim, cfg["residual_rank"], bias=False)
            self.w_in_up = nn.Linear(cfg["residual_rank"], dim, bias=False)
        if routes:
            self.pool_base = Pooler(dim, cfg["memory_dim"], cfg["memory_tokens"] // routes, cfg["pool_heads"])
        if routes == 2:
            self.pool_detail = Pooler(dim, cfg["memory_dim"], cfg["memory_tokens"] // 2, cfg["pool_heads"])

    def residual(self, degraded: torch.Tensor, grid: tuple[int, int], scene_grid: tuple[int, int]) -> torch.Tensor:
        """s_deg W_in(resize(x_deg)), added to the embedded scene tokens."""
        return self.scale * self.w_in_up(self.w_in_down(resize_tokens(degraded, grid, scene_grid)))

    def memory(self, degraded: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[P_base(x_deg); P_detail(x_deg - smooth(x_deg))] (one route: P_base(x_deg))."""
        base = self.pool_base(degraded)
        if not hasattr(self, "pool_detail"):
            return base
        return torch.cat([base, self.pool_detail(degraded - smooth(degraded, grid))], dim=1)


class IConFaceSide(nn.Module):
    """All side pathways of one IConFace variant; state-dict names are those of `iconface_side.safetensors`."""

    def __init__(self, cfg: dict, hidden_size: int, num_blocks: int, text_shape: tuple[int, int] | None = None):
        super().__init__()
        self.config = dict(cfg)
        residual, identity, routes = VARIANTS[cfg["variant"]]
        if identity:
            self.identity = IdentityPathway(hidden_size, cfg["id_dim"])
        if residual or routes:
            self.structure = StructurePathway(hidden_size, cfg)
        if routes:
            self.memory_xattn = nn.ModuleList(
                [MemoryCrossAttention(hidden_size, cfg["memory_dim"], cfg["xattn_rank"], cfg["xattn_heads"])
                 for _ in range(num_blocks)])
        if text_shape is not None:
            self.register_buffer("prompt_embeds", torch.zeros(text_shape))
            self.register_buffer("negative_prompt_embeds", torch.zeros(text_shape))

    @classmethod
    def from_file(cls, path: str) -> IConFaceSide:
        """The side pathways (and prompt embeddings) of an `iconface_side.safetensors`, strictly loaded."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "iconface" not in meta:
                raise ValueError(f"{path}: no 'iconface' metadata; not written by convert.export")
            info = json.loads(meta["iconface"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        text_shape = tuple(state["prompt_embeds"].shape) if "prompt_embeds" in state else None
        side = cls(info["config"], info["hidden_size"], info["num_layers"] + info["num_single_layers"], text_shape)
        side.load_state_dict(state, strict=True)
        return side


@torch.no_grad()
def iconface_velocity(transformer: nn.Module, side: IConFaceSide, scene: torch.Tensor, degraded: torch.Tensor,
                      references: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor,
                      e_id: torch.Tensor | None = None, *, grid: tuple[int, int],
                      degraded_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Scene velocity (B, h*w, C) of IConFace: diffusers' `Flux2Transformer2DModel` pieces with the side pathways."""
    cfg, bb = side.config, transformer
    degraded_grid = degraded_grid or grid
    b, n_scene, n_deg, n_refs = scene.shape[0], scene.shape[1], degraded.shape[1], references.shape[1]
    conditioning = torch.cat([degraded, references.reshape(b, -1, references.shape[-1])], dim=1)
    conditioning_ids = torch.cat([image_ids(cfg["t_degraded"], degraded_grid)]
                                 + [image_ids(cfg["t_reference"] + r, grid) for r in range(n_refs)])
    cached = cfg.get("reference_cache", False)
    n_cond = conditioning.shape[1]
    # The reference cache runs as diffusers' Flux2 KV "extract" pass: cached tokens first in the image stream.
    segments = [(scene, image_ids(cfg["t_scene"], grid)), (conditioning, conditioning_ids)]
    if cached:
        segments.reverse()
    tokens, ids = torch.cat([t for t, _ in segments], 1), torch.cat([i for _, i in segments])
    scene_at, deg_at = (n_cond, 0) if cached else (0, n_scene)
    img_rope, txt_rope = bb.pos_embed(ids), bb.pos_embed(text_ids(text.shape[1]))
    rope = (torch.cat([txt_rope[0], img_rope[0]]), torch.cat([txt_rope[1], img_rope[1]]))

    temb = bb.time_guidance_embed(sigma.to(scene.dtype) * 1000, None)
    mod_img, mod_txt = bb.double_stream_modulation_img(temb), bb.double_stream_modulation_txt(temb)
    mod_single = bb.single_stream_modulation(temb)

    img, txt = bb.x_embedder(tokens), bb.context_embedder(text)
    x_deg = img[:, deg_at:deg_at + n_deg]
    residual, identity, routes = VARIANTS[cfg["variant"]]
    scene_slice = slice(scene_at, scene_at + n_scene)
    if residual:
        img = torch.cat([img[:, :scene_at], img[:, scene_slice] + side.structure.residual(x_deg, degraded_grid, grid),
                         img[:, scene_at + n_scene:]], 1)
    memory = side.structure.memory(x_deg, degraded_grid) if routes else None

    n_txt, n_img = txt.shape[1], img.shape[1]
    d_dbl = d_sgl = 0
    if identity:
        if e_id is None:
            raise ValueError(f"variant {cfg['variant']!r} needs the identity anchor e_id")
        d_dbl, d_sgl = side.identity(e_id)
    # diffusers' blocks take per-token modulations (B, L, kD): text keeps the shared single-stream one.
    per_token = lambda m, n: m[:, None].expand(-1, n, -1)
    mod_single = torch.cat([per_token(mod_single, n_txt), per_token(mod_single + d_sgl, n_img)], dim=1)
    mod_img = mod_img + d_dbl
    kwargs = None
    if cached:  # cached tokens: modulated at timestep 0 and attending only among themselves
        temb0 = bb.time_guidance_embed(torch.zeros_like(sigma, dtype=scene.dtype), None)
        mod_img = torch.cat([per_token(bb.double_stream_modulation_img(temb0) + d_dbl, n_cond),
                             per_token(mod_img, n_scene)], dim=1)
        mod_single[:, n_txt:n_txt + n_cond] = per_token(bb.single_stream_modulation(temb0) + d_sgl, n_cond)
        _use_kv_processors(bb)
        kwargs = {"kv_cache": None, "kv_cache_mode": "extract", "num_ref_tokens": n_cond, "num_txt_tokens": n_txt}

    # The memory's readers: the scene tokens, or every image token (the cached ones too: reading in the extract
    # pass is reading once, as the memory does not depend on sigma).
    readers = slice(scene_at, scene_at + n_scene) if cfg.get("memory_readers", "image") == "scene" else slice(0, n_img)

    def read_memory(index: int, h: torch.Tensor, start: int) -> torch.Tensor:
        if memory is None:
            return h
        lo, hi = start + readers.start, start + readers.stop
        return torch.cat([h[:, :lo], side.memory_xattn[index](h[:, lo:hi], memory), h[:, hi:]], dim=1)

    for i, block in enumerate(bb.transformer_blocks):
        double_kwargs = None if kwargs is None else {k: v for k, v in kwargs.items() if k != "num_txt_tokens"}
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb_mod_img=mod_img,
                         temb_mod_txt=mod_txt, image_rotary_emb=rope, joint_attention_kwargs=double_kwargs)
        img = read_memory(i, img, 0)
    x = torch.cat([txt, img], dim=1)
    for i, block in enumerate(bb.single_transformer_blocks):
        x = block(hidden_states=x, encoder_hidden_states=None, temb_mod=mod_single, image_rotary_emb=rope,
                  joint_attention_kwargs=kwargs)
        x = read_memory(len(bb.transformer_blocks) + i, x, n_txt)
    out = bb.proj_out(bb.norm_out(x[:, n_txt + scene_at:n_txt + scene_at + n_scene], temb))
    if cfg.get("prediction", "velocity") == "clean":  # the network predicts clean tokens (IConFaceConfig)
        return (scene - out) / sigma.clamp(min=cfg["clean_sigma_floor"]).reshape(-1, 1, 1).to(out.dtype)
    return out


def _use_kv_processors(transformer: nn.Module) -> None:
    """diffusers' Flux2 KV attention processors (as its Klein KV pipeline sets them; equal without KV arguments)."""
    from diffusers.models.transformers.transformer_flux2 import (Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
