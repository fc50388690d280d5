"""The published Subject-Diffusion pipeline's models and thresholds (`data_process.py`, arXiv 2307.11410):
one place, read by the stages and by the command line, which must not import torch to show its help."""

CAPTIONER = "Salesforce/blip-image-captioning-large"  # the script's BLIP (the paper says BLIP-2)
NOUNS = "spacy:en_core_web_sm"  # spaCy's NOUN tokens
DETECTOR = "IDEA-Research/grounding-dino-tiny"  # Grounding DINO SwinT-OGC
SEGMENTER = "facebook/sam-vit-huge"  # SAM ViT-H
BOX_THRESHOLD, TEXT_THRESHOLD, NMS_IOU = 0.25, 0.2, 0.5
