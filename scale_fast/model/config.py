"""SCALEConfig: the sizes of the SCALE model, one dataclass for every stack and modality."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, Tuple

from .._validate import DEFAULT_MODALITIES

MODALITIES: Tuple[str, ...] = DEFAULT_MODALITIES  # the model's modality axis is the loss's default order
TOKEN_MODALITIES = ("text", "table")
FEATURE_MODALITIES = ("image", "video", "audio")
MISSING_MODES = ("zero", "mask", "drop")
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
# each masked task and the modality it masks, in the order of SCALEConfig.tasks
TASK_MODALITY = {"mlm": "text", "mem": "table", "mrp": "image", "mfp": "video", "mam": "audio"}
MODALITY_TASK = {m: t for t, m in TASK_MODALITY.items()}
TASKS: Tuple[str, ...] = tuple(TASK_MODALITY)


@dataclass
class SCALEConfig:
    """Sizes and options of :class:`scale_fast.model.SCALEModel`.

    The dataclass defaults are the sizes of SCALE's released code (768 wide, 6-layer
    modality encoders, a 6-layer, 8-head JCT, the M5Product input dimensions and the
    sequence lengths text 36, table 64, image 37, video 13, audio 81: each length
    counts the modality's CLS token at position 0).  ``SCALEConfig.tiny()`` is the
    CPU-sized default of ``scale-fast pretrain`` and of the synthetic world.

    Modalities are always ordered ``MODALITIES`` = (text, image, table, video, audio):
    the modality axis of ``embeddings`` [M, B, D] and ``present`` [M, B].
    """

    # -- stacks
    hidden_size: int = 768            # width of the modality encoders
    encoder_layers: int = 6           # layers per modality encoder
    encoder_heads: int = 12
    jct_hidden_size: int = 768        # width of the Joint Co-Transformer
    jct_layers: int = 6
    jct_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    embed_dim: int = 1024             # contrastive embedding size (SCALE's pooler: 768 -> 1024)
    pooler: str = "relu"              # projection head on each encoder's CLS: Linear(H, embed_dim) then ReLU
                                      # ("relu", SCALE's pooler) or nothing ("linear")

    # -- inputs
    text_vocab_size: int = 21128      # Chinese BERT vocabulary, as in M5Product
    table_vocab_size: int = 21128
    pad_token_id: int = 0
    mask_token_id: int = 103          # BERT's [MASK]
    num_special_tokens: int = 106     # ids below this are never drawn as MLM random replacements
    image_feature_dim: int = 2048     # region features
    box_dim: int = 5                  # 4 (x1, y1, x2, y2) or 5 (+ area), normalised to [0, 1]
    num_region_classes: int = 1601    # detector classes (MRP with mrp_loss="kl")
    video_feature_dim: int = 1024
    audio_feature_dim: int = 751

    # -- lengths (CLS included)
    text_len: int = 36
    table_len: int = 64
    image_len: int = 37
    video_len: int = 13
    audio_len: int = 81

    # -- behaviour
    cls_mode: str = "mean"            # image/video/audio CLS: "mean" of valid features (SCALE) or "learned"
    token_cls: str = "learned"        # text/table CLS input: "learned" (BERT's [CLS]) or "mean" (learned vector
                                      # + mean of the token embeddings: informative from the first step)
    missing: str = "drop"             # "zero" (paper), "mask" (absent tokens masked out) or "drop" (removed)
    attention: str = "auto"           # "auto" | "sdpa" | "xformers"
    mask_prob: float = 0.15           # MLM / MEM / MRP / MFP / MAM masking rate
    mrp_loss: str = "mse"             # "mse" (2048-d features) or "kl" (region class distributions)
    mfp_loss: str = "mse"             # "mse" or "nce"
    mam_loss: str = "mse"             # "mse" or "nce"
    tasks: Tuple[str, ...] = TASKS
    positional_rows: Tuple[str, ...] = ()  # feature modalities whose row k means the same in every product
                                      # (a descriptor split into fixed rows): their CLS input is a projection of
                                      # the concatenated rows, not of the rows' mean (docs/data_format.md)
    contrastive_inputs: str = "clean" # "clean": contrastive CLS from the unmasked inputs (one extra encoder
                                      # pass); "masked": from the masked inputs, one pass (SCALE's released code)

    # -- masked-task weights in the total: contrastive + sum of weight * task loss (SCALE: all 1)
    mlm_weight: float = 1.0
    mem_weight: float = 1.0
    mrp_weight: float = 1.0
    mfp_weight: float = 1.0
    mam_weight: float = 1.0

    # -- loss (passed to scale_fast.SCALELoss)
    logit_scale: float = 1 / 0.07
    learnable_logit_scale: bool = False
    loss_mode: str = "sample"
    loss_form: str = "ntxent"
    harmonize: bool = True
    harmonize_warmup_steps: int = 0   # pretrain: weights 1 (harmonize off) for this many first steps
    detach_weights: bool = False
    absent_in_loss: bool = False      # missing="zero" only: absent modalities' zero-imputed embeddings take
                                      # part in the loss (present all True), exactly as the released code

    def __post_init__(self):
        for f in dataclasses.fields(self):  # the type of each field's default (an int also fits a float field)
            value, kind = getattr(self, f.name), type(f.default)
            ok = (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) if kind is tuple
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
                  else isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
            if not ok:
                raise TypeError(f"SCALEConfig.{f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
        self.tasks = tuple(self.tasks)
        self.positional_rows = tuple(self.positional_rows)
        for name, value, choices in (
            ("missing", self.missing, MISSING_MODES),
            ("attention", self.attention, ATTENTION_BACKENDS),
            ("cls_mode", self.cls_mode, ("mean", "learned")),
            ("pooler", self.pooler, ("relu", "linear")),
            ("token_cls", self.token_cls, ("learned", "mean")),
            ("mrp_loss", self.mrp_loss, ("mse", "kl")),
            ("mfp_loss", self.mfp_loss, ("mse", "nce")),
            ("mam_loss", self.mam_loss, ("mse", "nce")),
            ("contrastive_inputs", self.contrastive_inputs, ("clean", "masked")),
        ):
            if value not in choices:
                raise ValueError(f"SCALEConfig.{name} must be one of {choices}, got {value!r}")
        bad = set(self.tasks) - set(TASKS)
        if bad:
            raise ValueError(f"SCALEConfig.tasks has unknown tasks {sorted(bad)}")
        bad = set(self.positional_rows) - set(FEATURE_MODALITIES)
        if bad:
            raise ValueError(f"SCALEConfig.positional_rows takes feature modalities {FEATURE_MODALITIES}, got {sorted(bad)}")
        for t in TASKS:
            w = getattr(self, f"{t}_weight")
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"SCALEConfig.{t}_weight must be a number >= 0, got {w!r}")
        if self.box_dim not in (4, 5):
            raise ValueError(f"SCALEConfig.box_dim must be 4 or 5, got {self.box_dim}")
        if self.hidden_size % self.encoder_heads or self.jct_hidden_size % self.jct_heads:
            raise ValueError("hidden sizes must be divisible by their head counts")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"SCALEConfig.mask_prob must lie in (0, 1), got {self.mask_prob}")
        for m in MODALITIES:
            if getattr(self, f"{m}_len") < 2:
                raise ValueError(f"SCALEConfig.{m}_len must be >= 2 (CLS + one token)")

    @classmethod
    def tiny(cls, **overrides) -> "SCALEConfig":
        """The CPU-sized default: 64 wide, 1-layer encoders, a 2-layer JCT, the synthetic world's inputs.

        Audio frames are 128-d here (M5Product's are 751-d); the sequence lengths stay SCALE's.
        Trained from scratch (SCALE starts from pretrained encoders), it needs three choices:
        token_cls="mean" (text/table CLS input = learned vector + mean token embedding, so the
        CLS carries the tokens from step 0, like SCALE's feature CLS), pooler="linear" and
        harmonize_warmup_steps=60 (the first 60 steps with weights 1): with S' from random
        encoders, the un-detached weights of a not-yet-informative modality are driven to 0
        (that lowers the loss) and the modality never learns.  The masked tasks are weighted
        0.1 (SCALE: 1): at 1 their losses are 2-3x the contrastive term and steer the encoders
        away from retrieval (measured in docs/pretraining.md).
        """
        base = dict(
            hidden_size=64, encoder_layers=1, encoder_heads=2,
            jct_hidden_size=64, jct_layers=2, jct_heads=2,
            mlp_ratio=2.0, dropout=0.0, embed_dim=64, pooler="linear", token_cls="mean", harmonize_warmup_steps=60,
            text_vocab_size=512, table_vocab_size=512, pad_token_id=0, mask_token_id=1,
            num_special_tokens=4, num_region_classes=32, audio_feature_dim=128,
            mlm_weight=0.1, mem_weight=0.1, mrp_weight=0.1, mfp_weight=0.1, mam_weight=0.1,
        )
        base.update(overrides)
        return cls(**base)

    # -- helpers
    def seq_len(self, modality: str) -> int:
        return getattr(self, f"{modality}_len")

    @property
    def lengths(self) -> Dict[str, int]:
        return {m: self.seq_len(m) for m in MODALITIES}

    def feature_dim(self, modality: str) -> int:
        return getattr(self, f"{modality}_feature_dim")

    def task_weight(self, task: str) -> float:
        return float(getattr(self, f"{task}_weight"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        d["positional_rows"] = list(self.positional_rows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SCALEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SCALEConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes) -> "SCALEConfig":
        return dataclasses.replace(self, **changes)

_KIND_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", tuple: "a list of strings"}

__all__ = ["SCALEConfig", "MODALITIES", "TOKEN_MODALITIES", "FEATURE_MODALITIES", "TASKS", "TASK_MODALITY",
           "MODALITY_TASK"]
