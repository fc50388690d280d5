"""Streaming a built dataset: a fixed order per epoch, every sample once per epoch however the micro-batches are
spread over processes and workers, the partial batch carried over, positions reached without decoding what
lies before them, the same samples over http on 127.0.0.1, damaged samples replaced and counted, bad input
in one line, and a run killed with SIGKILL that resumes on exactly the batches of an uninterrupted one."""

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multiconcept.datasets import stream as stream_module
from multiconcept.datasets.loader import MicroBatchLoader, Schedule
from multiconcept.datasets.stream import open_stream
from multiconcept.datasets.synthetic import write_synthetic_dataset
from multiconcept.errors import UserError
from multiconcept.workflows.encoder_data import subject_record

N, PER_SHARD = 37, 10  # shards of 10, 10, 10 and 7: epochs end mid-batch


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("stream") / "ds", N, per_shard=PER_SHARD)


def key_only(shard, key, parts):
    return key


def run_keys(stream, positions):
    return [stream.read(i, key_only).key for i in positions]


def test_each_epoch_is_a_fixed_order_of_every_sample(ds):
    s = open_stream(str(ds), seed=1)
    first, second = run_keys(s, range(N)), run_keys(s, range(N, 2 * N))
    assert len(set(first)) == N and sorted(first) == sorted(second)  # without replacement
    assert first != second  # each epoch has its own order
    assert run_keys(open_stream(str(ds), seed=1), range(N)) == first  # fixed for the seed
    assert run_keys(open_stream(str(ds), seed=2), range(N)) != first


def flattened(ds, processes, workers, grad_accum, steps, batch=4):
    """Every micro-batch's keys in global order (step, then micro), gathered over the processes."""
    got = {}
    for rank in range(processes):
        loader = MicroBatchLoader(open_stream(str(ds), seed=0), Schedule(batch, grad_accum, processes, rank), key_only,
                                  lambda values, step, micro: values, workers)
        for step in range(steps):
            for m in range(grad_accum):
                micro = m * processes + rank
                item = loader.get(step, micro)
                assert item["batch"] == [k.split("/")[1] for k in (s.key for s in item["samples"])]
                got[(step, micro)] = [s.key for s in item["samples"]]
        loader.close()
    return [k for _, keys in sorted(got.items()) for k in keys]


def test_any_split_over_processes_and_workers_reads_the_same_stream(ds):
    one = flattened(ds, processes=1, workers=0, grad_accum=2, steps=10)  # 80 samples: two epochs and a bit
    assert one == run_keys(open_stream(str(ds), seed=0), range(80))
    assert flattened(ds, processes=2, workers=2, grad_accum=1, steps=10) == one
    assert flattened(ds, processes=2, workers=1, grad_accum=2, steps=5) == one
    # every sample once per epoch; micro-batch 9 (samples 36-39) ends epoch 0 and starts epoch 1
    assert len(set(one[:N])) == N and len(set(one[N:2 * N])) == N
    assert set(one[36:40]) & set(one[:36]) == set(one[37:40])


def test_a_position_is_reached_without_reading_or_decoding_what_lies_before(ds, monkeypatch):
    opened, loaded = [], []
    real = stream_module.read_whole
    monkeypatch.setattr(stream_module, "read_whole", lambda shard: opened.append(shard.name) or real(shard))
    s = open_stream(str(ds), seed=0)
    s.read(5 * N + 3, lambda shard, key, parts: loaded.append(key))
    assert len(opened) == 1 and len(loaded) == 1


def serve(folder: Path):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_same_samples_over_http_from_127_0_0_1(ds):
    server = serve(ds.parent)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        local = run_keys(open_stream(str(ds), seed=0), range(45))
        assert run_keys(open_stream(f"{url}/ds", seed=0), range(45)) == local
        # a plain WebDataset over http, counted by reading it: the same shards in the same order
        assert run_keys(open_stream(url + "/ds/shards/{000000..000003}.tar", seed=0), range(45)) == local
        with pytest.raises(UserError, match="HTTP 404"):
            open_stream(f"{url}/nothing-here")
    finally:
        server.shutdown()


def corrupt_one_image(ds: Path, dst: Path) -> str:
    """A copy of the dataset with one image's bytes zeroed in place (sizes unchanged): its SHARD/KEY."""
    shutil.copytree(ds, dst)
    tar = dst / "shards" / "000001.tar"
    with tarfile.open(tar) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(".png") and ".mask" not in m.name)
    with open(tar, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\0" * m.size)
    return f"000001/{m.name.split('.')[0]}"


def test_a_damaged_sample_is_replaced_and_counted(ds, tmp_path, run_cli, caplog):
    bad = corrupt_one_image(ds, tmp_path / "ds")
    s = open_stream(str(tmp_path / "ds"), seed=0)
    got = [s.read(i, subject_record) for i in range(N)]
    assert bad not in {g.key for g in got} and len(got) == N  # every position still gives a sample
    where = [i for i, g in enumerate(got) if g.skipped]
    assert len(where) == 1 and len(got[where[0]].skipped) == 1 and got[where[0]].skipped[0].startswith(f"{bad}: ")
    # in training (one step whose batch reaches it): counted in the log, the warning names it
    code, _, err = run_cli("train-encoder", "--method", "subject-diffusion", "--data", tmp_path / "ds", "--base", "tiny",
                           "--out", tmp_path / "sd", "--steps", "1", "--batch-size", where[0] + 1, "--param",
                           "warmup_steps=0", "--no-progress")
    assert code == 0, err
    assert f"skipped a damaged sample, {bad}: UnidentifiedImageError" in caplog.text
    log = [json.loads(line) for line in (tmp_path / "sd" / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [1]


def webdataset_without_masks(folder: Path) -> Path:
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for name, data in (("a.jpg", b"\xff\xd8 not really"), ("a.txt", b"a dog"), ("a.json", b'{"caption": "a dog"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, __import__("io").BytesIO(data))
    return folder


@pytest.mark.parametrize("case", ["not a built dataset", "unfinished build", "no masks", "size differs", "missing shard",
                                  "no such url"])
def test_bad_datasets_are_one_line_before_training(ds, tmp_path, run_cli, case):
    data = tmp_path / "data"
    if case == "not a built dataset":
        data.mkdir()
        (data / "photo.jpg").write_bytes(b"x")
        expect = "is neither a built dataset"
    elif case == "unfinished build":
        shutil.copytree(ds, data)
        (data / "shards.json").unlink()
        expect = "has shards/ but no shards.json"
    elif case == "no masks":
        data = webdataset_without_masks(data) / "*.tar"
        expect = "has no subject masks"
    elif case == "size differs":
        shutil.copytree(ds, data)
        with open(data / "shards" / "000002.tar", "ab") as f:
            f.write(b"\0" * 1024)
        expect = "but shards.json says"
    elif case == "missing shard":
        shutil.copytree(ds, data)
        (data / "shards" / "000003.tar").unlink()
        expect = "is missing (shards.json lists it)"
    else:
        data = "http://127.0.0.1:9/ds"  # the discard port: nothing listens
        expect = "cannot open http://127.0.0.1:9/ds/shards.json"
    code, _, err = run_cli("train-encoder", "--method", "fastcomposer", "--data", data, "--base", "tiny",
                           "--out", tmp_path / "out", "--steps", "1", "--no-progress")
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def sample_log(folder: Path) -> dict:
    """(step, micro) -> keys; a step logged again after the resume keeps its last record."""
    return {(r["step"], r["micro"]): r["keys"] for r in map(json.loads, (folder / "samples.jsonl").read_text().splitlines())}


def test_a_run_killed_at_a_random_step_resumes_on_the_same_batches(ds, tmp_path, run_cli):
    args = ["train-encoder", "--method", "fastcomposer", "--data", str(ds), "--base", "tiny", "--steps", "8",
            "--batch-size", "4", "--lr", "1e-3", "--param", "checkpoint_every=1", "--sample-log", "--no-progress"]
    code, _, err = run_cli(*args, "--out", tmp_path / "whole")
    assert code == 0, err
    kill_at = random.randrange(1, 5)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "multiconcept", *args, "--out", str(killed), "--workers", "1"],
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # the in-process run's
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "samples.jsonl").is_file() or kill_at not in {
            r["step"] for r in map(json.loads, (killed / "samples.jsonl").read_text().splitlines() or [])}:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "fastcomposer.json").exists() and (killed / "checkpoint.safetensors").is_file()
    code, _, err = run_cli(*args, "--out", killed, "--resume")
    assert code == 0, err
    assert sample_log(killed) == sample_log(tmp_path / "whole"), f"killed at step {kill_at}"
    whole, resumed = load_file(str(tmp_path / "whole" / "fusion.safetensors")), load_file(str(killed / "fusion.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), f"killed at step {kill_at}"
