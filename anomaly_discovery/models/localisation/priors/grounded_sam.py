"""Grounded SAM object prior: GroundingDINO boxes from a text prompt, then SAM masks (methods.md §2, step 1).

Everything is loaded from user paths and nothing is fetched:

- SAM (package ``segment_anything``): the model is built from its classes for ``vit_b``/``vit_l``/``vit_h`` (or
  a custom :class:`SamArchitecture`) and the checkpoint is loaded with ``torch.load(weights_only=True)``.
- GroundingDINO (package ``groundingdino``, pip ``groundingdino-py``): its Python config file is read as
  literal assignments (never executed); its BERT text encoder and tokenizer come from a local Hugging Face
  folder ``text_encoder_path``; its checkpoint is a ``weights_only`` load of ``{"model": state_dict}``.

transformers 5 removed the BERT helpers GroundingDINO's ``BertModelWarper`` calls (``get_head_mask``,
``get_extended_attention_mask(..., device)``), and its tokenizer/encoder helpers would resolve
``"bert-base-uncased"`` on the hub. While the model is built, :func:`load_grounding_dino` swaps those three
names in the groundingdino modules for local equivalents (:class:`BertTextEncoder` and local-only loaders),
then restores them.

Per image: boxes whose best token score exceeds ``box_threshold`` and that name a prompt word above
``text_threshold`` are kept (NMS, at most ``max_boxes``); SAM turns each box into a mask; the union is the
object mask. No box kept → the whole image, with the reason given.
"""

from __future__ import annotations

import ast
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, nms

from anomaly_discovery.models.features.backbones import IMAGENET_MEAN, IMAGENET_STD, WeightsError, load_weights
from .base import ObjectMask, check_images, full_frame

logger = logging.getLogger(__name__)

GROUNDING_SETTINGS = (
    "modelname", "backbone", "position_embedding", "pe_temperatureH", "pe_temperatureW",
    "return_interm_indices", "backbone_freeze_keywords", "enc_layers", "dec_layers", "pre_norm",
    "dim_feedforward", "hidden_dim", "dropout", "nheads", "num_queries", "query_dim", "num_patterns",
    "num_feature_levels", "enc_n_points", "dec_n_points", "two_stage_type", "two_stage_bbox_embed_share",
    "two_stage_class_embed_share", "transformer_activation", "dec_pred_bbox_embed_share",
    "dn_box_noise_scale", "dn_label_noise_ratio", "dn_labelbook_size", "max_text_len", "use_text_enhancer",
    "use_fusion_layer", "use_transformer_ckpt", "use_text_cross_attention", "text_dropout",
    "fusion_dropout", "fusion_droppath", "sub_sentence_present", "embed_init_tgt",
)
SWIN_BACKBONES = ("swin_T_224_1k", "swin_B_224_22k", "swin_B_384_22k", "swin_L_224_22k", "swin_L_384_22k")
TEXT_ENCODER_FILES = "config.json, model weights and tokenizer files"


@dataclass(frozen=True)
class SamArchitecture:
    """The shape of a SAM model: ViT image encoder, prompt encoder and two-way-transformer mask decoder."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_ARCHITECTURES = {
    "vit_b": SamArchitecture("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchitecture("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchitecture("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
}


def sam_architecture(model_type: str | SamArchitecture) -> SamArchitecture:
    """The architecture named ``vit_b``/``vit_l``/``vit_h`` (or the one given)."""
    if isinstance(model_type, SamArchitecture):
        return model_type
    if model_type not in SAM_ARCHITECTURES:
        raise ValueError(f"unknown sam_model_type {model_type!r}: use one of {', '.join(SAM_ARCHITECTURES)}")
    return SAM_ARCHITECTURES[model_type]


def build_sam(architecture: SamArchitecture) -> nn.Module:
    """A randomly initialised ``segment_anything`` Sam of ``architecture``."""
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    arch = architecture
    grid = arch.image_size // arch.patch_size
    encoder = ImageEncoderViT(
        depth=arch.encoder_depth, embed_dim=arch.encoder_embed_dim, img_size=arch.image_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=arch.encoder_num_heads,
        patch_size=arch.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=arch.encoder_global_attn_indexes, window_size=arch.window_size,
        out_chans=arch.prompt_embed_dim)
    prompt_encoder = PromptEncoder(embed_dim=arch.prompt_embed_dim, image_embedding_size=(grid, grid),
                                   input_image_size=(arch.image_size, arch.image_size), mask_in_chans=16)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=arch.prompt_embed_dim, mlp_dim=arch.decoder_mlp_dim,
                                      num_heads=arch.decoder_num_heads),
        transformer_dim=arch.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=arch.iou_head_hidden_dim)
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder)


def load_sam(checkpoint: str | Path, model_type: str | SamArchitecture = "vit_b") -> nn.Module:
    """SAM of ``model_type`` with the weights of ``checkpoint`` (strict; WeightsError names file and type)."""
    arch = sam_architecture(model_type)
    if not Path(checkpoint).is_file():
        raise WeightsError(f"SAM checkpoint not found: {checkpoint} (expected SAM {arch.name} weights)")
    sam = build_sam(arch)
    load_weights(sam, Path(checkpoint), f"SAM {arch.name}")
    return sam.eval()


def read_grounding_config(path: str | Path) -> SimpleNamespace:
    """GroundingDINO settings from a ``.py`` file of literal assignments (not executed) or a ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GroundingDINO config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        settings = json.loads(text)
    else:
        settings = {}
        for node in ast.parse(text, filename=str(path)).body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                raise ValueError(f"GroundingDINO config {path}, line {node.lineno}: only `name = literal` "
                                 "assignments are read")
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError as exc:
                raise ValueError(f"GroundingDINO config {path}, line {node.lineno}: value of "
                                 f"{node.targets[0].id!r} is not a literal") from exc
    missing = [name for name in GROUNDING_SETTINGS if name not in settings]
    if missing:
        raise ValueError(f"GroundingDINO config {path} lacks settings: {', '.join(missing)}")
    if settings["backbone"] not in SWIN_BACKBONES:
        raise ValueError(f"GroundingDINO config {path}: backbone {settings['backbone']!r} is not supported "
                         f"offline; use one of {', '.join(SWIN_BACKBONES)}")
    return SimpleNamespace(**settings)


class BertTextEncoder(nn.Module):
    """A BERT encoder that takes GroundingDINO's per-phrase self-attention mask (B×N×N) under transformers 5.

    Same submodule names as GroundingDINO's ``BertModelWarper`` (embeddings, encoder, pooler), so checkpoint
    keys ``bert.*`` load unchanged. Returns ``{"last_hidden_state": B×N×hidden}``.
    """

    def __init__(self, bert_model: nn.Module):
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **_unused) -> dict[str, torch.Tensor]:
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, :].expand(-1, input_ids.shape[1], -1)
        additive = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
        additive = additive.masked_fill(~attention_mask.bool(), torch.finfo(hidden.dtype).min)
        encoded = self.encoder(hidden, attention_mask=additive[:, None])
        return {"last_hidden_state": encoded.last_hidden_state}


def _check_text_encoder_folder(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise WeightsError(f"text encoder folder {path} has no config.json (expected a local BERT folder: "
                           f"{TEXT_ENCODER_FILES})")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "bert":
        raise WeightsError(f"text encoder {path} is a {model_type!r} model; GroundingDINO needs BERT")


def _local_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _local_bert(path: str):
    from transformers import BertModel

    try:
        return BertModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load BERT from {path} ({TEXT_ENCODER_FILES}): {exc}") from exc


@contextmanager
def _local_text_encoder() -> Iterator[None]:
    """Point groundingdino's text-encoder helpers at local-only, transformers-5-compatible versions."""
    import groundingdino.models.GroundingDINO.groundingdino as gd_model
    from groundingdino.util import get_tokenlizer

    saved = (gd_model.BertModelWarper, get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model)
    gd_model.BertModelWarper = BertTextEncoder
    get_tokenlizer.get_tokenlizer = _local_tokenizer
    get_tokenlizer.get_pretrained_language_model = _local_bert
    try:
        yield
    finally:
        (gd_model.BertModelWarper, get_tokenlizer.get_tokenlizer,
         get_tokenlizer.get_pretrained_language_model) = saved


def build_grounding_dino(config: str | Path | SimpleNamespace, text_encoder_path: str | Path) -> nn.Module:
    """A GroundingDINO shaped by ``config`` (file or settings); BERT and tokenizer from ``text_encoder_path``."""
    from groundingdino.models import build_model

    args = config if isinstance(config, SimpleNamespace) else read_grounding_config(config)
    text_encoder = Path(text_encoder_path)
    _check_text_encoder_folder(text_encoder)
    args = SimpleNamespace(**{**vars(args), "text_encoder_type": str(text_encoder), "use_checkpoint": False,
                              "use_transformer_ckpt": False})
    with _local_text_encoder():
        return build_model(args)


def _read_grounding_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"GroundingDINO checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or non-weights file
        raise WeightsError(f"cannot read GroundingDINO checkpoint {path} with weights_only=True (re-save it as "
                           f"{{'model': state_dict}}): {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"GroundingDINO checkpoint {path} holds no state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_grounding_dino(config_path: str | Path, checkpoint: str | Path, text_encoder_path: str | Path) -> nn.Module:
    """GroundingDINO with ``checkpoint`` loaded; ``bert.*`` keys are optional (the text encoder folder has them).

    Missing detector weights or shape mismatches raise WeightsError naming the file and the config.
    """
    settings = read_grounding_config(config_path)
    model = build_grounding_dino(settings, text_encoder_path)
    checkpoint = Path(checkpoint)
    state = _read_grounding_state(checkpoint)
    expected = model.state_dict()
    architecture = f"GroundingDINO {settings.backbone} from config {config_path}"
    missing = [key for key in expected if key not in state and not key.startswith("bert.")]
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                  for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or mismatched:
        detail = "; ".join(filter(None, [
            f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})" if missing else "",
            f"{len(mismatched)} shape mismatches (e.g. {', '.join(mismatched[:3])})" if mismatched else ""]))
        raise WeightsError(f"GroundingDINO checkpoint {checkpoint} does not fit {architecture}: {detail}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        logger.warning("GroundingDINO checkpoint %s: ignoring %d unexpected keys (e.g. %s)", checkpoint,
                       len(unexpected), ", ".join(unexpected[:3]))
    model.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=False)
    return model.eval()


def detection_input(image: np.ndarray, short_side: int, long_side: int) -> torch.Tensor:
    """RGB uint8 H×W×3 → normalised 3×h×w, short side ``short_side`` unless the long side would pass ``long_side``."""
    height, width = image.shape[:2]
    scale = min(short_side / min(height, width), long_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (tensor - mean) / std


def caption(prompt: str) -> str:
    """GroundingDINO's caption form: lower case, ending with a period."""
    text = prompt.lower().strip()
    return text if text.endswith(".") else text + "."


class GroundedSAMPrior:
    """Object masks from a text prompt: GroundingDINO boxes, SAM masks, union per image."""

    name = "grounded-sam"

    def __init__(self, sam_checkpoint: str | Path, sam_model_type: str | SamArchitecture = "vit_b", *,
                 grounding_config: str | Path, grounding_checkpoint: str | Path, text_encoder_path: str | Path,
                 prompt: str = "magnetic tile", box_threshold: float = 0.3, text_threshold: float = 0.25,
                 device: str | torch.device = "cpu", detection_size: int = 800, max_boxes: int = 10,
                 nms_iou: float = 0.5):
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold),
                            ("nms_iou", nms_iou)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not prompt.strip():
            raise ValueError("prompt must name the product, got an empty string")
        if detection_size < 32 or max_boxes < 1:
            raise ValueError(f"detection_size must be ≥ 32 and max_boxes ≥ 1, got {detection_size}, {max_boxes}")
        from segment_anything import SamPredictor

        self.prompt = prompt
        self.sam_model_type = sam_architecture(sam_model_type).name
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.detection_size = detection_size
        self.max_boxes = max_boxes
        self.nms_iou = nms_iou
        self.device = torch.device(device)
        self.sam = load_sam(sam_checkpoint, sam_model_type).to(self.device)
        self.detector = load_grounding_dino(grounding_config, grounding_checkpoint, text_encoder_path).to(self.device)
        self.predictor = SamPredictor(self.sam)
        self._caption = caption(prompt)
        self._word_tokens = self._prompt_word_tokens()

    def _prompt_word_tokens(self) -> torch.Tensor:
        """Bool over the 256 text slots: True at the caption's word tokens (not [CLS]/[SEP]/./?)."""
        tokenizer = self.detector.tokenizer
        ids = tokenizer(self._caption)["input_ids"]
        special = set(tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]))
        words = torch.zeros(self.detector.max_text_len, dtype=torch.bool)
        for position, token in enumerate(ids[: self.detector.max_text_len]):
            words[position] = token not in special
        return words

    @torch.no_grad()
    def detect_boxes(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (n×4, x0 y0 x1 y1 in pixels) and scores of the prompt in one RGB uint8 image."""
        height, width = image.shape[:2]
        long_side = round(self.detection_size * 1333 / 800)
        batch = detection_input(image, self.detection_size, long_side)[None].to(self.device)
        outputs = self.detector(batch, captions=[self._caption])
        token_scores = outputs["pred_logits"][0].float().sigmoid().cpu()
        boxes = outputs["pred_boxes"][0].float().cpu()
        box_scores = token_scores.max(dim=1).values
        names_prompt = (token_scores[:, self._word_tokens] > self.text_threshold).any(dim=1)
        keep = (box_scores > self.box_threshold) & names_prompt
        pixels = box_convert(boxes[keep], "cxcywh", "xyxy") * torch.tensor([width, height, width, height])
        pixels = pixels.clamp(min=0).minimum(torch.tensor([width, height, width, height], dtype=torch.float32))
        chosen = nms(pixels, box_scores[keep], self.nms_iou)[: self.max_boxes]
        return pixels[chosen].numpy(), box_scores[keep][chosen].numpy()

    @torch.no_grad()
    def segment_boxes(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Union of SAM's single-mask predictions for ``boxes`` (n×4 pixels) on one RGB uint8 image."""
        self.predictor.set_image(image, image_format="RGB")
        prompts = self.predictor.transform.apply_boxes_torch(
            torch.as_tensor(boxes, dtype=torch.float32, device=self.device), image.shape[:2])
        masks, _, _ = self.predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
        self.predictor.reset_image()
        return masks[:, 0].any(dim=0).cpu().numpy()

    def segment(self, images: Sequence[np.ndarray],
                normal_images: Sequence[np.ndarray] | None = None) -> list[ObjectMask]:
        """Object mask per image; ``normal_images`` are not needed (the prompt defines the object)."""
        results = []
        for image in check_images(images):
            boxes, scores = self.detect_boxes(image)
            if len(boxes) == 0:
                reason = (f"grounded-sam: no box for {self.prompt!r} scored above box_threshold="
                          f"{self.box_threshold}; whole image used")
                logger.info(reason)
                results.append(ObjectMask(full_frame(image), reason))
                continue
            mask = self.segment_boxes(image, boxes)
            if not mask.any():
                reason = f"grounded-sam: SAM gave empty masks for {len(boxes)} box(es); whole image used"
                logger.info(reason)
                results.append(ObjectMask(full_frame(image), reason))
                continue
            results.append(ObjectMask(mask, f"grounded-sam: {len(boxes)} box(es) for {self.prompt!r} "
                                            f"(best score {scores.max():.2f}); {mask.mean():.0%} of the image"))
        return results

    def masks(self, images: Sequence[np.ndarray],
              normal_images: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        return [item.mask for item in self.segment(images, normal_images)]
