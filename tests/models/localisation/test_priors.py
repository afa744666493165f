"""Object priors: the statistical fallback on constructed images, and the Grounded SAM adapter end to end with
a tiny randomly initialised SAM, GroundingDINO and BERT written to tmp files (no network, no real weights)."""

from __future__ import annotations

import socket

import cv2
import numpy as np
import pytest
import torch

from anomaly_discovery.data.sample import NORMAL_LABEL
from anomaly_discovery.data.synthetic.render import render_image
from anomaly_discovery.models.features.backbones import WeightsError
from anomaly_discovery.models.localisation.priors.grounded_sam import (BertTextEncoder, GroundedSAMPrior,
                                                                       SamArchitecture, build_grounding_dino, build_sam,
                                                                       load_grounding_dino, load_sam,
                                                                       read_grounding_config)
from anomaly_discovery.models.localisation.priors.base import NoObjectPrior, ObjectPrior
from anomaly_discovery.models.localisation.priors.factory import build_object_prior
from anomaly_discovery.models.localisation.priors.statistical import StatisticalObjectPrior
from tests.conftest import shared_dataset

TINY_SAM = SamArchitecture("tiny", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                           encoder_global_attn_indexes=(1,), image_size=128, window_size=4,
                           prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
OTHER_SAM = SamArchitecture("other", encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2,
                            encoder_global_attn_indexes=(1,), image_size=128, window_size=4,
                            prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "magnetic", "tile", "bottle"]
TINY_GROUNDING_SETTINGS = dict(
    modelname="groundingdino", backbone="swin_T_224_1k", position_embedding="sine", pe_temperatureH=20,
    pe_temperatureW=20, return_interm_indices=[1, 2, 3], backbone_freeze_keywords=None, enc_layers=1,
    dec_layers=1, pre_norm=False, dim_feedforward=64, hidden_dim=256, dropout=0.0, nheads=4, num_queries=12,
    query_dim=4, num_patterns=0, num_feature_levels=4, enc_n_points=2, dec_n_points=2,
    two_stage_type="standard", two_stage_bbox_embed_share=False, two_stage_class_embed_share=False,
    transformer_activation="relu", dec_pred_bbox_embed_share=True, dn_box_noise_scale=1.0,
    dn_label_noise_ratio=0.5, dn_label_coef=1.0, dn_bbox_coef=1.0, embed_init_tgt=True, dn_labelbook_size=2000,
    max_text_len=256, text_encoder_type="bert-base-uncased", use_text_enhancer=True, use_fusion_layer=True,
    use_checkpoint=False, use_transformer_ckpt=False, use_text_cross_attention=True, text_dropout=0.0,
    fusion_dropout=0.0, fusion_droppath=0.1, sub_sentence_present=True,
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def disc_on_texture(seed: int = 0, shape=(180, 240), radius: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    disc = (rows - shape[0] / 2) ** 2 + (cols - shape[1] / 2) ** 2 <= radius**2
    background = cv2.GaussianBlur(rng.normal(50, 15, shape).astype(np.float32), (0, 0), 1.0)
    image = np.where(disc, 200 + rng.normal(0, 10, shape), background)
    return np.clip(image, 0, 255).astype(np.uint8), disc


def texture(seed: int = 0, shape=(180, 240)) -> np.ndarray:
    noise = cv2.GaussianBlur(np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32), (0, 0), 3)
    return np.clip(128 + 120 * noise, 0, 255).astype(np.uint8)


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every float tensor shifted, so equality after loading proves the file was read."""
    return {key: value + 0.25 if value.is_floating_point() else value.clone() for key, value in state.items()}


@pytest.fixture(autouse=True, scope="module")
def no_network():
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny BERT folder, GroundingDINO config + checkpoint and SAM checkpoint, with their saved weights."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("grounded_sam")
    bert_dir = root / "bert"
    BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)}).save_pretrained(bert_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert_dir)
    config = root / "grounding_tiny.py"
    config.write_text("".join(f"{key} = {value!r}\n" for key, value in TINY_GROUNDING_SETTINGS.items()))
    grounding_state = perturbed(build_grounding_dino(config, bert_dir).state_dict())
    grounding_checkpoint = root / "grounding.pth"
    torch.save({"model": grounding_state}, grounding_checkpoint)
    sam_state = perturbed(build_sam(TINY_SAM).state_dict())
    sam_checkpoint = root / "sam.pth"
    torch.save(sam_state, sam_checkpoint)
    return dict(root=root, bert=bert_dir, config=config, grounding=grounding_checkpoint,
                grounding_state=grounding_state, sam=sam_checkpoint, sam_state=sam_state)


def make_prior(files, **options) -> GroundedSAMPrior:
    return GroundedSAMPrior(files["sam"], TINY_SAM, grounding_config=files["config"],
                            grounding_checkpoint=files["grounding"], text_encoder_path=files["bert"],
                            detection_size=96, **options)


@pytest.fixture(scope="module")
def grounded_sam(tiny_files) -> GroundedSAMPrior:
    return make_prior(tiny_files, box_threshold=0.0, text_threshold=0.0)


# --- trivial prior and the statistical fallback -------------------------------------------------------------


def test_no_object_prior_marks_every_pixel():
    masks = NoObjectPrior().masks([np.zeros((5, 7), np.uint8), np.zeros((3, 4, 3), np.uint8)])
    assert [m.shape for m in masks] == [(5, 7), (3, 4)]
    assert all(m.dtype == bool and m.all() for m in masks)


def test_fallback_segments_bright_disc_on_textured_background():
    image, disc = disc_on_texture()
    result = StatisticalObjectPrior().segment([image])[0]
    assert result.mask.dtype == bool and result.mask.shape == disc.shape
    assert iou(result.mask, disc) > 0.9
    assert "object" in result.reason


def test_fallback_gives_whole_frame_on_full_frame_texture():
    result = StatisticalObjectPrior().segment([texture()])[0]
    assert result.mask.mean() > 0.99
    assert "full-frame texture" in result.reason


def test_fallback_learns_background_from_normal_images_of_a_product():
    bottles = [render_image("bottle", NORMAL_LABEL, 192, (seed,)) for seed in range(6)]
    images = [bottle.image for bottle in bottles]
    results = StatisticalObjectPrior().segment(images[:3], normal_images=images[3:])
    assert all(iou(r.mask, b.object_mask) > 0.9 for r, b in zip(results, bottles[:3]))
    assert "normal images" in results[0].reason


def test_fallback_keeps_whole_frame_for_texture_products_despite_a_large_blob():
    blob_image = texture(seed=10)
    cv2.circle(blob_image, (120, 90), 50, 255, thickness=-1)
    normals = [texture(seed) for seed in range(4)]
    result = StatisticalObjectPrior().segment([blob_image], normal_images=normals)[0]
    assert result.mask.all()
    assert "4/4 normal images" in result.reason


def test_fallback_refuses_non_uint8_image_naming_it():
    with pytest.raises(ValueError, match=r"images\[1\].*float64"):
        StatisticalObjectPrior().masks([texture(), np.zeros((8, 8))])


@pytest.mark.shared_data
def test_fallback_gives_whole_frame_on_mtd_tiles():
    files = sorted((shared_dataset("mtd") / "MT_Free" / "Imgs").glob("*.jpg"))[:40:4]
    images = [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in files]
    masks = StatisticalObjectPrior().masks(images)
    assert all(mask.all() for mask in masks)


# --- build_object_prior --------------------------------------------------------------------------------------


def test_auto_prior_falls_back_and_names_the_missing_setting(tmp_path):
    prior, reason = build_object_prior("auto", sam_checkpoint=tmp_path / "absent.pth")
    assert isinstance(prior, StatisticalObjectPrior) and isinstance(prior, ObjectPrior)
    assert "absent.pth does not exist" in reason


def test_none_and_fallback_priors_are_built_by_name():
    assert isinstance(build_object_prior("none")[0], NoObjectPrior)
    assert isinstance(build_object_prior("fallback")[0], StatisticalObjectPrior)


def test_grounded_sam_prior_without_paths_is_refused():
    with pytest.raises(ValueError, match="sam_checkpoint is not configured"):
        build_object_prior("grounded-sam")


def test_unknown_prior_kind_is_refused():
    with pytest.raises(ValueError, match="'sam'"):
        build_object_prior("sam")


def test_auto_prior_uses_grounded_sam_when_all_files_exist(tiny_files):
    prior, reason = build_object_prior(
        "auto", sam_checkpoint=tiny_files["sam"], grounding_config=tiny_files["config"],
        grounding_checkpoint=tiny_files["grounding"], text_encoder_path=tiny_files["bert"],
        sam_model_type=TINY_SAM, prompt="bottle", detection_size=64)
    assert isinstance(prior, GroundedSAMPrior)
    assert "Grounded SAM" in reason and "'bottle'" in reason


# --- Grounded SAM adapter ------------------------------------------------------------------------------------


def test_sam_checkpoint_weights_are_loaded(tiny_files):
    loaded = load_sam(tiny_files["sam"], TINY_SAM).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in tiny_files["sam_state"].items())


def test_grounding_checkpoint_weights_are_loaded(grounded_sam, tiny_files):
    loaded = grounded_sam.detector.state_dict()
    assert loaded.keys() == tiny_files["grounding_state"].keys()
    assert all(torch.equal(loaded[key], value) for key, value in tiny_files["grounding_state"].items())


def test_grounding_checkpoint_without_bert_keeps_the_text_encoder_folder_weights(tiny_files):
    from transformers import BertModel

    state = {k: v for k, v in tiny_files["grounding_state"].items() if not k.startswith("bert.")}
    path = tiny_files["root"] / "no_bert.pth"
    torch.save({"model": state}, path)
    model = load_grounding_dino(tiny_files["config"], path, tiny_files["bert"])
    folder = BertModel.from_pretrained(tiny_files["bert"], local_files_only=True)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, folder.embeddings.word_embeddings.weight)
    assert torch.equal(model.feat_map.weight, state["feat_map.weight"])


def test_bert_text_encoder_matches_bert_model_on_an_open_mask(tiny_files):
    from transformers import BertModel

    bert = BertModel.from_pretrained(tiny_files["bert"], local_files_only=True).eval()
    ids = torch.tensor([[2, 7, 8, 5, 3]])
    with torch.no_grad():
        ours = BertTextEncoder(bert)(ids, attention_mask=torch.ones(1, 5, 5, dtype=torch.bool))
        reference = bert(input_ids=ids)
    torch.testing.assert_close(ours["last_hidden_state"], reference.last_hidden_state)


def test_grounded_sam_gives_bool_masks_of_each_image_shape(grounded_sam):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (64, 50), dtype=np.uint8)]
    results = grounded_sam.segment(images)
    assert [r.mask.shape for r in results] == [(70, 90), (64, 50)]
    assert all(r.mask.dtype == bool and r.mask.any() for r in results)
    assert all(r.reason.startswith("grounded-sam") for r in results)


def test_grounded_sam_detects_boxes_inside_the_image(grounded_sam):
    boxes, scores = grounded_sam.detect_boxes(np.full((60, 80, 3), 128, np.uint8))
    assert 1 <= len(boxes) <= grounded_sam.max_boxes and len(scores) == len(boxes)
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= 80) and np.all(boxes[:, [1, 3]] <= 60)


def test_grounded_sam_without_a_box_uses_the_whole_image(tiny_files):
    prior = make_prior(tiny_files, box_threshold=1.0)
    result = prior.segment([np.full((40, 52, 3), 90, np.uint8)])[0]
    assert result.mask.shape == (40, 52) and result.mask.all()
    assert "no box" in result.reason


def test_missing_sam_checkpoint_error_names_the_file(tmp_path):
    with pytest.raises(WeightsError, match=r"nothing\.pth.*SAM vit_b"):
        load_sam(tmp_path / "nothing.pth", "vit_b")


def test_mismatched_sam_checkpoint_error_names_file_and_architecture(tiny_files):
    with pytest.raises(WeightsError, match=r"sam\.pth does not fit SAM other"):
        load_sam(tiny_files["sam"], OTHER_SAM)


def test_missing_grounding_checkpoint_error_names_the_file(tiny_files):
    with pytest.raises(WeightsError, match=r"absent_gdino\.pth"):
        load_grounding_dino(tiny_files["config"], tiny_files["root"] / "absent_gdino.pth", tiny_files["bert"])


def test_mismatched_grounding_checkpoint_error_names_file_and_config(tiny_files):
    state = dict(tiny_files["grounding_state"])
    state["feat_map.weight"] = torch.zeros(3, 3)
    path = tiny_files["root"] / "bad_gdino.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsError, match=r"bad_gdino\.pth does not fit GroundingDINO swin_T_224_1k.*feat_map"):
        load_grounding_dino(tiny_files["config"], path, tiny_files["bert"])


def test_grounding_config_with_code_or_missing_settings_is_refused(tmp_path):
    code = tmp_path / "code.py"
    code.write_text("import os\n")
    with pytest.raises(ValueError, match=r"code\.py, line 1"):
        read_grounding_config(code)
    partial = tmp_path / "partial.py"
    partial.write_text("modelname = 'groundingdino'\n")
    with pytest.raises(ValueError, match=r"partial\.py lacks settings: backbone"):
        read_grounding_config(partial)


def test_text_encoder_folder_without_config_is_refused(tiny_files, tmp_path):
    with pytest.raises(WeightsError, match="has no config.json"):
        build_grounding_dino(tiny_files["config"], tmp_path)
