"""SyntheticProducts: a generative world of products whose modalities all derive from one latent identity.

The world (fixed by world_seed):
  * 24 product clusters ("categories") with long-tailed popularity (Zipf) and centres
    mu_c ~ N(0, I_16);
  * 16 attributes, each with 20 values; a product's value of attribute a is
    argmax_v (U_a z)_v + 0.3 * Gumbel noise (a noisy quantisation of its latent);
  * a vocabulary: 4 special ids (0 pad, 1 [MASK], 2, 3), 60 filler words, 4 category
    words per cluster, one property-name word per attribute, one word per
    attribute value (tiny default vocabulary: 512);
  * fixed random nonlinear maps (tanh MLP -> ReLU) from the latent to region
    (2048-d), frame (1024-d) and audio-frame (128-d in the tiny default) features.

A product (fixed by world_seed, seed and its index):
  z = mu_c + N(0, I_16); each modality sees its own noisy copy z + 0.25 N(0, I);
  text: a category word, then the value words of 8..12 random attributes, with filler;
  table: 6..12 (property, value) pairs (the value sometimes followed by a category word);
  image: 6..16 regions, each from (z_image, one of 8 part prototypes, region noise),
         with 5-number boxes and, if asked, region class distributions;
  video: 4..12 frames; audio: 10..40 frames (each from (z, time, frame noise)).
Missing modalities are long-tailed: text always, image 85%, table 80%, video 30%, audio 20%.

Cross-modal retrieval is learnable because every modality is a function of z, and
hard enough to need training: tokens carry z only through quantised attributes, the
features through random nonlinear maps with noise.  Train and held-out sets are new
draws of one world: SyntheticProducts(n, seed=0) and SyntheticProducts(1000, seed=1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..model.config import SCALEConfig

LATENT = 16
CLUSTERS = 24
ATTRIBUTES = 16
VALUES = 20
FILLERS = 60
CATEGORY_WORDS = 4
PARTS = 8
HIDDEN = 48
SPECIAL = 4
PRESENT_RATES = {"text": 1.0, "image": 0.85, "table": 0.8, "video": 0.3, "audio": 0.2}


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through einsum's own loops: single-threaded and the same for every batch
    composition (BLAS threads oversubscribe a busy 2-core machine on these small products)."""
    return np.einsum("ij,jk->ik", a, b)


@dataclass
class _Map:
    """A fixed random nonlinear map: relu(G tanh(A x + a) + g)."""

    A: np.ndarray
    a: np.ndarray
    G: np.ndarray
    g: np.ndarray

    @classmethod
    def make(cls, rng: np.random.Generator, d_in: int, d_out: int) -> "_Map":
        A = (rng.standard_normal((d_in, HIDDEN)) / np.sqrt(d_in) * 1.5).astype(np.float32)
        a = (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)
        G = (rng.standard_normal((HIDDEN, d_out)) / np.sqrt(HIDDEN) * 1.5).astype(np.float32)
        g = (rng.standard_normal(d_out) * 0.1).astype(np.float32)
        return cls(A, a, G, g)

    def hidden(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(_mm(x, self.A) + self.a)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(_mm(self.hidden(x), self.G) + self.g, 0.0)


class World:
    """The fixed generative world of one world_seed (see the module docstring)."""

    def __init__(self, world_seed: int, config: SCALEConfig):
        need = SPECIAL + FILLERS + CLUSTERS * CATEGORY_WORDS + ATTRIBUTES + ATTRIBUTES * VALUES
        for name in ("text_vocab_size", "table_vocab_size"):
            if getattr(config, name) < need:
                raise ValueError(f"the synthetic world needs {name} >= {need}, got {getattr(config, name)}")
        if config.num_special_tokens > SPECIAL or config.mask_token_id >= SPECIAL or config.pad_token_id != 0:
            raise ValueError("the synthetic world uses pad id 0, [MASK] < 4 and num_special_tokens <= 4")
        rng = np.random.default_rng([7919, int(world_seed)])
        self.config = config
        pop = 1.0 / np.arange(1, CLUSTERS + 1) ** 0.8
        self.cluster_p = pop / pop.sum()
        self.centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
        self.attr_maps = (rng.standard_normal((ATTRIBUTES, LATENT, VALUES)) * 1.5).astype(np.float32)
        # vocabulary layout
        self.filler_ids = SPECIAL + np.arange(FILLERS)
        fp = 1.0 / np.arange(1, FILLERS + 1)
        self.filler_p = fp / fp.sum()
        base = SPECIAL + FILLERS
        self.category_ids = base + np.arange(CLUSTERS * CATEGORY_WORDS).reshape(CLUSTERS, CATEGORY_WORDS)
        cp = 1.0 / np.arange(1, CATEGORY_WORDS + 1)
        self.category_p = cp / cp.sum()
        base += CLUSTERS * CATEGORY_WORDS
        self.property_ids = base + np.arange(ATTRIBUTES)
        base += ATTRIBUTES
        self.value_ids = base + np.arange(ATTRIBUTES * VALUES).reshape(ATTRIBUTES, VALUES)
        # feature maps: (latent, context, noise) -> features
        self.parts = rng.standard_normal((PARTS, 8)).astype(np.float32)
        self.image_map = _Map.make(rng, LATENT + 8 + 8, config.image_feature_dim)
        self.video_map = _Map.make(rng, LATENT + 4 + 8, config.video_feature_dim)
        self.audio_map = _Map.make(rng, LATENT + 4 + 8, config.audio_feature_dim)
        self.class_map = (rng.standard_normal((HIDDEN, config.num_region_classes)) * 2.0).astype(np.float32)
        self.part_boxes = rng.uniform(0.1, 0.9, size=(PARTS, 2)).astype(np.float32)


def _time_features(n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    return np.concatenate([np.sin(np.pi * t), np.cos(np.pi * t), np.sin(3 * np.pi * t), np.cos(3 * np.pi * t)], 1)


class SyntheticProducts:
    """Map-style dataset of n synthetic products of the world `world_seed` (see the module docstring).

    dataset[i] -> a sample dict (scale_fast.data.collate's format), deterministic in
    (world_seed, seed, i).  config: the SCALEConfig whose inputs it must match
    (vocabulary, feature sizes, box size, region classes); default SCALEConfig.tiny().
    region_classes: also emit region class distributions (for MRP with kl).
    present_rates: override the per-modality presence probabilities.
    """

    def __init__(self, n: int, seed: int = 0, world_seed: int = 0, *, config: Optional[SCALEConfig] = None,
                 region_classes: Optional[bool] = None, present_rates: Optional[dict] = None):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n, self.seed, self.world_seed = int(n), int(seed), int(world_seed)
        self.config = config or SCALEConfig.tiny()
        self.world = World(self.world_seed, self.config)
        self.region_classes = (self.config.mrp_loss == "kl") if region_classes is None else bool(region_classes)
        self.present_rates = dict(PRESENT_RATES, **(present_rates or {}))

    def __len__(self) -> int:
        return self.n

    def latent(self, i: int):
        """(cluster, z) of product i."""
        rng = np.random.default_rng([self.world_seed, self.seed, int(i), 1])
        c = int(rng.choice(CLUSTERS, p=self.world.cluster_p))
        z = self.world.centres[c] + rng.standard_normal(LATENT).astype(np.float32)
        return c, z

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} products")
        i = int(i) % self.n
        w, cfg = self.world, self.config
        c, z = self.latent(i)
        rng = np.random.default_rng([self.world_seed, self.seed, i, 2])
        has = {m: bool(rng.random() < p) for m, p in self.present_rates.items()}
        gumbel = -np.log(-np.log(rng.uniform(1e-9, 1.0, size=(ATTRIBUTES, VALUES))))
        values = np.argmax(np.einsum("d,adv->av", z, w.attr_maps) + 0.3 * gumbel, axis=1)
        sample = {"id": f"w{self.world_seed}-s{self.seed}-{i}"}

        def noisy():
            return (z + 0.25 * rng.standard_normal(LATENT)).astype(np.float32)

        def category_word():
            return int(w.category_ids[c, rng.choice(CATEGORY_WORDS, p=w.category_p)])

        if has["text"]:
            tokens = [category_word()]
            for a in rng.permutation(ATTRIBUTES)[: rng.integers(8, 13)]:
                tokens.append(int(w.value_ids[a, values[a]]))
                if rng.random() < 0.3:
                    tokens.append(int(rng.choice(w.filler_ids, p=w.filler_p)))
            sample["text"] = np.asarray(tokens, dtype=np.int64)
        if has["table"]:
            pairs = []
            for a in np.sort(rng.permutation(ATTRIBUTES)[: rng.integers(6, 13)]):
                value = [int(w.value_ids[a, values[a]])]
                if rng.random() < 0.3:
                    value.append(category_word())
                pairs.append((np.asarray([w.property_ids[a]], dtype=np.int64), np.asarray(value, dtype=np.int64)))
            sample["table"] = pairs
        if has["image"]:
            R = int(rng.integers(6, 17))
            part = rng.integers(0, PARTS, size=R)
            x = np.concatenate([np.broadcast_to(noisy(), (R, LATENT)), w.parts[part],
                                0.5 * rng.standard_normal((R, 8)).astype(np.float32)], axis=1)
            h = w.image_map.hidden(x)
            feats = np.maximum(_mm(h, w.image_map.G) + w.image_map.g, 0.0).astype(np.float32)
            centre = w.part_boxes[part] + 0.05 * rng.standard_normal((R, 2)).astype(np.float32)
            size = rng.uniform(0.1, 0.4, size=(R, 2)).astype(np.float32)
            lo, hi = np.clip(centre - size / 2, 0, 1), np.clip(centre + size / 2, 0, 1)
            area = ((hi - lo).prod(axis=1, keepdims=True))
            boxes = np.concatenate([lo, hi, area], axis=1)[:, : cfg.box_dim].astype(np.float32)
            image = {"features": feats, "boxes": boxes}
            if self.region_classes:
                logits = _mm(h, w.class_map)
                logits = logits - logits.max(axis=1, keepdims=True)
                p = np.exp(logits)
                image["classes"] = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
            sample["image"] = image
        for m, lo_hi, fmap in (("video", (4, 13), w.video_map), ("audio", (10, 41), w.audio_map)):
            if has[m]:
                T = int(rng.integers(*lo_hi))
                x = np.concatenate([np.broadcast_to(noisy(), (T, LATENT)), _time_features(T),
                                    0.5 * rng.standard_normal((T, 8)).astype(np.float32)], axis=1)
                sample[m] = {"features": fmap(x).astype(np.float32)}
        return sample
