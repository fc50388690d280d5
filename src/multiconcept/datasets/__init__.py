"""Subject datasets: images with a caption and, per subject, a label, a box and a mask.

The builder (Subject-Diffusion's SDD pipeline, arXiv 2307.11410, on current
transformers) runs caption -> nouns -> boxes -> masks -> filters over a source
of images and writes WebDataset shards plus a Parquet index. Modules:
`sources` (folders, list files, img2dataset tars), `records` (one image and its
entities, and how they travel between processes), `captions` / `nouns` /
`boxes` / `masks` (the model stages), `filters` (the published filters),
`pipeline` (a batch through every stage), `shards` (writer and reader),
`toyworld` (ground-truth stand-ins), `tiny` (random-weight models for tests).

Training reads the shards through `stream` (a fixed order per epoch, any position, local or http) and
`loader` (each process's micro-batches, made by DataLoader workers); `tars` groups a tar's members into
samples for every reader; `synthetic` writes tiny datasets for tests and benchmarks.
"""
