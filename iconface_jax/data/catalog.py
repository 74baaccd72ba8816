"""The data sources by name: `make_source` builds the one a `data` config names (pipeline and latents share it)."""
from __future__ import annotations

import ml_collections

from iconface_jax.data.sources import FFHQRefSource, FolderSource, Source, TfdsSource
from iconface_jax.data.synthetic import SyntheticSource


def make_source(config: ml_collections.ConfigDict) -> Source:
    """The source named by `config.source`."""
    kind = config.source
    if kind == "synthetic":
        s = config.synthetic
        return SyntheticSource(s.num_identities, s.images_per_identity, config.resolution, s.seed, s.first_identity,
                               s.aligned)
    if kind == "ffhq_ref":
        s = config.ffhq_ref
        return FFHQRefSource(s.csv, s.image_dir, s.lq_dir, s.ref_dir, s.split_file)
    if kind == "folder":
        return FolderSource(config.folder.root)
    if kind == "tfds":
        s = config.tfds
        return TfdsSource(s.name, s.split, s.data_dir, s.image_key, s.identity_key)
    raise ValueError(f"unknown data source {kind!r}: synthetic, ffhq_ref, folder or tfds")
