"""The CPU demo: a tiny IConFace trained from scratch on synthetic identities in a few minutes.

Same code paths as the real config at toy sizes: a fixed 64 px codec instead of the VAE (each 8 px patch's
low DCT frequencies, 33 channels), a tiny transformer, a narrow random AdaFace (identity anchors and the
identity loss run, their values are not meaningful), fixed random prompt embeddings. Every field not set here
has its default (iconface_jax/config.py); why these values: docs/decisions.md#demo-size-and-schedule.
"""
import ml_collections

from iconface_jax import config


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    """The demo; `configs/demo.py:<variant>` selects a Table 3 row (concat | struct | id | one_route | full)."""
    c = config.defaults(variant)
    c.workdir = "runs/demo" if variant == "full" else f"runs/demo_{variant}"

    # Hidden size >= the token channels: proj_out must reach every channel, or the last sampling step cannot
    # cancel the noise outside its span (a 64-wide model on 192-channel pixel tokens sampled visible noise).
    c.model.backbone.update(
        preset="tiny", in_channels=33, num_layers=1, num_single_layers=2, num_attention_heads=6,
        attention_head_dim=32, axes_dims_rope=(8, 8, 8, 8), mlp_ratio=2.0, joint_attention_dim=32)
    c.model.precision = "float32"
    c.model.lora.update(rank=8, alpha=8.0, targets="flux2_klein_full")
    c.model.train_base = True  # from scratch the base is random: train it too
    # Clean-token prediction suits the narrow network on wide tokens (docs/decisions.md#clean-token-prediction).
    c.model.iconface.update(memory_tokens=16, memory_dim=32, pool_heads=2, xattn_rank=16, xattn_heads=2,
                            residual_rank=192, prediction="clean")
    # (6, 3) keeps 30.8 dB of the synthetic faces in 33-channel tokens; backbone.in_channels follows
    # (docs/decisions.md#demo-codec).
    c.model.autoencoder.update(kind="patchify", bands=(6, 3))
    c.model.face_encoder.update(units=(1, 1, 1, 1), channels=(8, 8, 16, 16))
    c.model.text.length = 8

    c.data.resolution = 64
    c.data.num_workers = 0
    c.data.synthetic.num_identities = 200

    # The sigma centre at 1 (median sigma .95): 10 of the sampler's 12 steps run above 0.68, and low sigmas'
    # large clean-token loss weights crowd those out (docs/decisions.md#training-sigma-law). 1600 steps of 4 see
    # what 800 of 8 would, and learn more. Three quarters of the samples train without the structure residual,
    # so they read the degraded image and the reference through attention (docs/decisions.md#residual-dropout).
    c.train.update(batch_size=4, steps=1600, learning_rate=2e-3, warmup_steps=50, weight_decay=0.0, ema_decay=0.0,
                   residual_dropout=0.75, lambda_id=0.05, sigma_mean=1.0, max_nonfinite=5)
    c.log.update(every=25, checkpoint_every=400, keep=2, sample_every=800)
    return c
