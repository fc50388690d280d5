"""The builder on ToyWorld renders with stand-in stages that answer from the renderer's ground truth:
filters on real masks, sources, shards and their reader, resume, rejects, the command line."""

import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from multiconcept.datasets.filters import PROFILES, FilterSettings
from multiconcept.datasets.pipeline import StageSpec
from multiconcept.datasets.shards import read_shard, read_shards
from multiconcept.datasets.sources import list_units
from multiconcept.datasets.toyworld import from_runs, runs, write_toyworld_source
from multiconcept.errors import UserError
from multiconcept.toyworld import subject_dataset
from multiconcept.workflows.dataset import BuildSettings, build

N, PER_SHARD = 60, 20


def settings(filters: FilterSettings, **kw) -> BuildSettings:
    return BuildSettings(stages=StageSpec(filters=filters).all_toyworld(), batch_size=8, **kw)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toyworld-src")
    write_toyworld_source(folder, N, seed=3, per_shard=PER_SHARD)
    return folder


def test_mask_runs_round_trip():
    _, subjects = subject_dataset(3, 0)[0]
    m = subjects[0].mask
    assert np.array_equal(from_runs(runs(m), m.shape), m)


def test_toyworld_profile_keeps_every_render_with_its_true_masks(source, tmp_path):
    report = build(source, tmp_path, settings(PROFILES["toyworld"]))
    truth = [r for s in range(N // PER_SHARD) for r in subject_dataset(PER_SHARD, 3 + s, colour_p=1.0)]
    assert report["images"] == {"in": N, "rejected": 0, "kept": N, "dropped_by_filters": 0}
    assert report["entities_kept"] == sum(len(subjects) for _, subjects in truth)
    samples = list(read_shards(tmp_path))
    assert len(samples) == N
    for s, (scene, subjects) in zip(samples, truth):
        assert s.caption == scene.caption
        assert np.array_equal(np.asarray(s.image()), scene.image)
        assert [e.label for e in s.entities] == [x.creature.kind for x in subjects]
        for e, x in zip(s.entities, subjects):
            assert e.box == tuple(float(v) for v in x.box)
            assert np.array_equal(e.mask, x.mask)
    index = pq.read_table(tmp_path / "index.parquet").to_pandas()
    assert len(index) == report["entities_kept"]
    assert set(index["shard"]) == {"00000", "00001", "00002"}
    assert (index["mask_area"] == [int(e.mask.sum()) for s in samples for e in s.entities]).all()
    assert not list(tmp_path.rglob("*.tmp"))


def test_published_mask_fill_drops_thin_shapes_on_real_masks(source, tmp_path):
    """ToyWorld's ghosts fill 53-61% of their box, robots 44-71% (less when another subject hides part of
    them): the published 60% drops most ghosts and keeps most robots."""
    f = replace(PROFILES["toyworld"], min_mask_fill=0.6)
    report = build(source, tmp_path, settings(f))
    kept = [e.label for s in read_shards(tmp_path) for e in s.entities]
    truth = [x for s in range(N // PER_SHARD) for _, subjects in subject_dataset(PER_SHARD, 3 + s) for x in subjects]
    share = {k: kept.count(k) / sum(x.creature.kind == k for x in truth) for k in ("robot", "ghost")}
    assert share["robot"] > 0.5 > share["ghost"], share
    fills = [x.mask.sum() / ((x.box[2] - x.box[0]) * (x.box[3] - x.box[1])) for x in truth]
    assert report["filters"]["min_mask_fill"] == {"level": "entity", "in": len(truth),
                                                  "dropped": sum(f < 0.6 for f in fills), "kept": sum(f >= 0.6 for f in fills)}


def test_published_profile_drops_every_64px_render_at_the_first_filter(source, tmp_path):
    report = build(source, tmp_path, settings(PROFILES["published"]))
    assert report["filters"]["min_long_side"] == {"level": "image", "in": N, "dropped": N, "kept": 0}
    assert report["images"]["kept"] == 0 and len(list(read_shards(tmp_path))) == 0


def test_unreadable_images_and_failing_stages_go_to_rejects(tmp_path):
    rec = subject_dataset(2, 0)
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for i, (scene, subjects) in enumerate(rec):
            buf = io.BytesIO()
            Image.fromarray(scene.image).save(buf, format="PNG")
            truth = {"caption": scene.caption, "objects": [{"noun": x.creature.kind, "box": list(x.box),
                                                            "mask": runs(x.mask)} for x in subjects]}
            add(f"good{i}.png", buf.getvalue())
            add(f"good{i}.json", json.dumps({"toyworld": truth}).encode())
        add("corrupt.jpg", b"not a jpeg")
        add("notruth.png", buf.getvalue())  # readable, but the stand-in caption stage has nothing to say
        add("textonly.txt", b"a caption without an image")
    report = build(src, tmp_path / "out", settings(PROFILES["toyworld"]))
    assert report["images"]["in"] == 5 and report["images"]["kept"] == 2 and report["images"]["rejected"] == 3
    rejects = {r["key"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    assert rejects["corrupt"].startswith("decode: ")
    assert rejects["notruth"].startswith("caption: ValueError: no ToyWorld ground truth")
    assert rejects["textonly"].startswith("read: sample has no image")


def test_rerun_skips_finished_shards_and_rebuilds_a_missing_one(source, tmp_path):
    s = settings(PROFILES["toyworld"])
    build(source, tmp_path, s)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    (tmp_path / "parts" / "00001.json").unlink()  # as if killed before shard 00001 was marked done
    seen = []
    report = build(source, tmp_path, s, progress=lambda shard, tally: seen.append(shard))
    assert set(seen) == {"00001"}
    after = {p.name: p.stat().st_mtime_ns for p in sorted((tmp_path / "shards").glob("*.tar"))}
    assert after["00000.tar"] == before["00000.tar"] and after["00002.tar"] == before["00002.tar"]
    assert report["images"]["in"] == N and report["shards"] == 3
    with pytest.raises(UserError, match="built with other settings"):
        build(source, tmp_path, settings(PROFILES["off"]))


def test_folder_and_list_sources_cut_into_shards(tmp_path):
    recs = subject_dataset(5, 1)
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i, (scene, _) in enumerate(recs):
        Image.fromarray(scene.image).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(scene.caption)
    units = list_units(tmp_path / "imgs", shard_size=2)
    assert [len(u.files) for u in units] == [2, 2, 1] and [u.name for u in units] == ["000000", "000001", "000002"]
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nimgs/sub/img0.png\nimgs/sub/img3.png\n")
    spec = StageSpec(captioner="source", nouns="toyworld", detector="toyworld", segmenter="toyworld",
                     filters=PROFILES["off"])
    # no ground truth in a plain folder: the captions come through, the stand-in nouns stage rejects each image
    report = build(listing, tmp_path / "out", BuildSettings(stages=spec))
    assert report["images"]["in"] == 2 and report["images"]["rejected"] == 2
    for bad, msg in ((tmp_path / "none", "does not exist"), (tmp_path / "list.txt", None)):
        if msg:
            with pytest.raises(UserError, match=msg):
                list_units(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        list_units(tmp_path / "empty")


def test_rle_masks_read_back_equal(source, tmp_path):
    build(source, tmp_path, settings(PROFILES["toyworld"], mask_format="rle"))
    first = next(read_shard(tmp_path / "shards" / "00000.tar"))
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tf:
        names = tf.getnames()
    assert not any(".mask_" in n for n in names)
    _, subjects = subject_dataset(PER_SHARD, 3)[0]
    assert all(np.array_equal(e.mask, x.mask) for e, x in zip(first.entities, subjects))


def test_cli_builds_and_refuses_bad_input_in_one_line(run_cli, source, tmp_path):
    tw = ["--captioner", "toyworld", "--nouns", "toyworld", "--detector", "toyworld", "--segmenter", "toyworld"]
    code, out, err = run_cli("dataset", "build", str(source), "--out", tmp_path / "a", *tw, "--filters", "toyworld")
    assert code == 0, err
    assert f"{N} of {N} images kept" in " ".join(out.split())
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["images"]["kept"] == N and stats["stages"]["masks"]["images"] == N
    for args, msg in ((["--filter", "min_score=x"], "--filter min_score=x"),
                      (["--filters", "laion"], "--filters 'laion'"),
                      (["--mask-format", "bmp"], "--mask-format 'bmp'"),
                      (["--nms", "half"], "--nms half")):
        code, out, err = run_cli("dataset", "build", str(source), "--out", tmp_path / "b", *tw, *args)
        assert code == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_ray_runs_locally_or_on_the_named_cluster(run_cli, monkeypatch, source, tmp_path):
    import multiconcept.workflows.dataset as wf

    seen = []
    monkeypatch.setattr(wf, "build", lambda src, out, cfg, progress=None: seen.append(cfg) or
                        {"shards": 0, "images": {"in": 0, "kept": 0, "rejected": 0}, "entities_kept": 0})
    for args, address in ((["--ray"], None), (["--ray-address", "ray://head:10001"], "ray://head:10001"), ([], None)):
        code, out, err = run_cli("dataset", "build", str(source), "--out", tmp_path / "o", *args, "--ray-workers", "3")
        assert code == 0, err
        assert seen[-1].ray == bool(args) and seen[-1].ray_address == address and seen[-1].ray_workers == 3


def test_train_encoder_trains_on_a_folder_the_builder_wrote(source, tmp_path):
    """Issue's consumer: FastComposer trains a few steps on the shards, their captions and true masks, streamed."""
    from multiconcept.methods.fastcomposer import FastComposerConfig
    from multiconcept.workflows.train_encoder import StreamSubjects, open_data, train_encoder

    build(source, tmp_path / "ds", settings(PROFILES["toyworld"]))
    table = json.loads((tmp_path / "ds" / "shards.json").read_text())
    assert table["samples"] == N and [s["samples"] for s in table["shards"]] == [PER_SHARD] * (N // PER_SHARD)
    assert all(s["bytes"] == (tmp_path / "ds" / "shards" / f"{s['name']}.tar").stat().st_size for s in table["shards"])
    data = open_data(str(tmp_path / "ds"))
    assert isinstance(data, StreamSubjects) and data.stream.total == N
    model = train_encoder(str(tmp_path / "ds"), tmp_path / "fc", base="tiny", progress=False,
                          cfg=FastComposerConfig(steps=3, batch_size=2, lr=1e-3, checkpoint_every=0))
    info = json.loads((model / "fastcomposer.json").read_text())
    assert info["steps_done"] == 3 and info["data"].startswith("shards ")
