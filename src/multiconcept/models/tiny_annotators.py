"""Tiny random-weight checkpoints of the builder's real model classes, built from configs and saved with their
processors, as transformers' own tests build theirs. They load through exactly the path a downloaded BLIP,
BLIP-2, Grounding DINO, OWLv2 or SAM takes (`load_captioner(folder)`, ...), so tests and benchmarks exercise the
real code offline. Their outputs are random: good for shapes and plumbing, not for quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
GLUE = ("a", "the", "and", "on", "left", "right", "background", ".")


def _bert_tokenizer(folder: Path, words, bos: bool = False):
    """A word-level BERT vocabulary: a random captioner over it writes captions made of these words, so a test
    that passes the nouns of the images it captions gets captions that name things."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + list(dict.fromkeys((*GLUE, *words)))) + "\n")
    return BertTokenizer(str(vocab), **({"bos_token": "[DEC]"} if bos else {}))


def write_vocabulary(path: str | Path, nouns) -> Path:
    """A noun list for `--nouns vocab:PATH`."""
    Path(path).write_text("\n".join(nouns) + "\n")
    return Path(path)


def save_tiny_blip(folder: str | Path, words, seed: int = 0, image_size: int = 32, width: int = 32, layers: int = 2,
                   patch_size: int = 4) -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = Path(folder)
    tok = _bert_tokenizer(folder, words, bos=True)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=40, bos_token_id=tok.bos_token_id,
                         pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id),
        projection_dim=width, image_text_hidden_size=width))
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tok).save_pretrained(folder)
    return folder


def save_tiny_blip2(folder: str | Path, seed: int = 0, image_size: int = 32, width: int = 32, queries: int = 4) -> Path:
    """BLIP-2 (ViT, Q-Former, OPT) with a CLIP-format BPE tokenizer that knows BLIP-2's <image> token."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from .tiny import tiny_tokenizer

    folder = Path(folder)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.image_token = "<image>"
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        qformer_config=dict(vocab_size=len(tok), hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=2 * width, encoder_hidden_size=width, max_position_embeddings=32),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=width, num_hidden_layers=1,
                         num_attention_heads=2, ffn_dim=2 * width, word_embed_proj_dim=width, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        num_query_tokens=queries, image_token_index=tok.convert_tokens_to_ids("<image>")))
    model.save_pretrained(folder)
    Blip2Processor(BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tok,
                   num_query_tokens=queries).save_pretrained(folder)
    return folder


def save_tiny_grounding_dino(folder: str | Path, words, seed: int = 0, image_size: int = 128, d_model: int = 32,
                             embed_dim: int = 8, layers: int = 1, queries: int = 8) -> Path:
    """Swin backbone from its config (no timm), BERT text tower from its config. 128 px: at 64 the last feature
    level is 1x1, where GroupNorm (32 groups of 32 channels) has one value per group and refuses."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoProcessor, SwinConfig
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    folder = Path(folder)
    tok = _bert_tokenizer(folder, words)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(GroundingDinoConfig(
        # decoder_layers=2: its box heads are tied across decoder layers, which one layer cannot be
        d_model=d_model, encoder_layers=layers, decoder_layers=max(2, layers), num_queries=queries,
        use_timm_backbone=False,
        backbone_config=SwinConfig(embed_dim=embed_dim, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=image_size,
                                   out_indices=[2, 3, 4]),
        text_config={"model_type": "bert", "vocab_size": len(tok), "hidden_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64},
        max_text_len=64, encoder_ffn_dim=d_model, decoder_ffn_dim=d_model, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2))
    model.save_pretrained(folder)
    GroundingDinoProcessor(GroundingDinoImageProcessorPil(size={"shortest_edge": image_size, "longest_edge": image_size}),
                           tok).save_pretrained(folder)
    return folder


def save_tiny_owlv2(folder: str | Path, seed: int = 0, image_size: int = 64, width: int = 32) -> Path:
    """OWLv2 with a CLIP-format BPE tokenizer; its processor pads every query to 16 tokens, as OWL's does."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    from .tiny import tiny_tokenizer

    folder = Path(folder)
    tok = tiny_tokenizer(max_length=16)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Owlv2ForObjectDetection(Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, **ids),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=width))
    model.save_pretrained(folder)
    Owlv2Processor(Owlv2ImageProcessorPil(size={"height": image_size, "width": image_size}), tok).save_pretrained(folder)
    return folder


def save_tiny_sam(folder: str | Path, seed: int = 0, image_size: int = 64, width: int = 32, layers: int = 2) -> Path:
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    folder = Path(folder)
    torch.manual_seed(seed)
    model = SamModel(SamConfig(
        vision_config=dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * width,
                           image_size=image_size, patch_size=8, output_channels=width, window_size=2,
                           global_attn_indexes=[layers - 1], num_pos_feats=width // 2, mlp_dim=2 * width),
        prompt_encoder_config=dict(hidden_size=width, image_size=image_size, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, mlp_dim=2 * width,
                                 iou_head_hidden_dim=width)))
    model.save_pretrained(folder)
    mask = image_size // 4
    SamProcessor(SamImageProcessorPil(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                                      mask_size={"longest_edge": mask}, mask_pad_size={"height": mask, "width": mask})
                 ).save_pretrained(folder)
    return folder


def save_tiny_models(folder: str | Path, words, nouns, seed: int = 0) -> dict[str, str]:
    """{captioner, detector, segmenter, nouns}: StageSpec arguments for the whole tiny pipeline; `words` and `nouns`
    make the captioner's and detector's vocabulary, `nouns` the noun list."""
    from . import quiet_loading

    folder = Path(folder)
    with quiet_loading():
        return {"captioner": str(save_tiny_blip(folder / "blip", (*words, *nouns), seed)),
                "detector": str(save_tiny_grounding_dino(folder / "grounding-dino", (*words, *nouns), seed)),
                "segmenter": str(save_tiny_sam(folder / "sam", seed)),
                "nouns": f"vocab:{write_vocabulary(folder / 'nouns.txt', nouns)}"}
