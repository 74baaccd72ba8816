"""The CPU demo: a tiny IConFace trained from scratch on synthetic identities in a few minutes.

Same code paths as the real config at toy sizes: a fixed 64 px codec instead of the VAE (each 8 px patch's
low DCT frequencies, 33 channels), a tiny transformer, a narrow random AdaFace (identity anchors and the
identity loss run, their values are not meaningful), fixed random prompt embeddings. Its choices are measured
in docs/decisions.md#demo-size-and-schedule (and the entries it links); docs/demo.md describes the demo.
"""
import ml_collections

from iconface_jax.data import pipeline


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    """The demo; `configs/demo.py:<variant>` selects a Table 3 row (concat | struct | id | one_route | full)."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/demo" if variant == "full" else f"runs/demo_{variant}"
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    c.model.weights = ""  # converted FLUX.2 weights; empty: random init of `backbone`
    # Hidden size >= the token channels: proj_out must reach every channel, or the last sampling step cannot
    # cancel the noise outside its span (a 64-wide model on 192-channel pixel tokens sampled visible noise).
    c.model.backbone = ml_collections.ConfigDict(dict(
        preset="tiny", in_channels=33, num_layers=1, num_single_layers=2, num_attention_heads=6,
        attention_head_dim=32, axes_dims_rope=(8, 8, 8, 8), mlp_ratio=2.0, joint_attention_dim=32))
    # Random init of the backbone: "torch" (torch.nn.Linear's) or "adaln_zero" (DiT's, for training from scratch).
    c.model.init = "torch"
    c.model.precision = "float32"
    c.model.attention = ""  # backend; empty: the platform default
    c.model.remat = "none"  # transformer blocks: none | full (keep block inputs) | save_dots (and matmul outputs)
    c.model.lora = ml_collections.ConfigDict(dict(rank=8, alpha=8.0, targets="flux2_klein_full"))
    # From scratch the base is random: train it too (the real config freezes it and trains LoRA).
    c.model.train_base = True
    c.model.iconface = ml_collections.ConfigDict(dict(
        variant=variant, memory_tokens=16, memory_dim=32, pool_heads=2, xattn_rank=16, xattn_heads=2,
        residual_rank=192, reference_cache=False, prediction="clean", memory_readers="image"))
    # bands=(luma, chroma): keep only each patch's low DCT frequencies (u + v below them): (6, 3) gives 33-channel
    # tokens that keep 30.8 dB of the synthetic faces; () keeps all 192 pixel values. backbone.in_channels follows.
    c.model.autoencoder = ml_collections.ConfigDict(dict(
        kind="patchify", factor=8, bands=(6, 3), weights="", remat_decoder=False))
    c.model.face_encoder = ml_collections.ConfigDict(dict(
        weights="", units=(1, 1, 1, 1), channels=(8, 8, 16, 16)))
    c.model.text = ml_collections.ConfigDict(dict(embeddings="", length=8))

    c.data = pipeline.default_config()
    c.data.resolution = 64
    c.data.num_workers = 0
    c.data.synthetic.num_identities = 200

    # Training sigma: `sigma_law` (logit_normal | uniform | mode) with sigma_mean / sigma_std, time-shifted by
    # `sigma_shift` (0: the sampler's dynamic shift exp(mu) at this resolution; 1: none, the authors' default);
    # a `sigma_unshifted_fraction` of the samples keeps the unshifted value (docs/decisions.md#training-sigma-law).
    # The demo centres it at 1 (median sigma .95): 10 of the sampler's 12 steps run above 0.68, and low sigmas'
    # large clean-token loss weights crowd those out. 1600 steps of 4 see what 800 of 8 would, and learn more.
    # term_grad_norms: log the gradient norms of L_fm and lambda_id L_id apart (one more backward pass on
    # steps with the identity loss).
    # residual_dropout: the share of samples trained without the structure residual. These must find the degraded
    # image through attention, and then use the reference too: at 0.75, +0.6-0.8 dB with a reference on two seeds,
    # its share of the trait error 0-3 % -> 7-16 % (docs/decisions.md#residual-dropout).
    c.train = ml_collections.ConfigDict(dict(
        batch_size=4, steps=1600, learning_rate=2e-3, warmup_steps=50, weight_decay=0.0, grad_clip=1.0,
        ema_decay=0.0, residual_dropout=0.75, lambda_id=0.05, lambda_h=0.5, omega_min=0.25, text_dropout=0.1,
        sigma_law="logit_normal", sigma_mean=1.0, sigma_std=1.0, sigma_shift=0.0,
        sigma_unshifted_fraction=0.0, term_grad_norms=False, max_nonfinite=5,
        stop_at=0))  # stop_at: leave (with a checkpoint) after this step, for staged runs; 0: run to `steps`
    # shard_min_size: frozen weights of fewer elements stay replicated when fsdp > 1
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_min_size=2**16))
    c.log = ml_collections.ConfigDict(dict(every=25, checkpoint_every=400, keep=2, sample_every=800,
                                           sample_count=4, sample_steps=12, guidance=4.0))
    return c
