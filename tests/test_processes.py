"""Several processes: `accelerate launch` with the shipped 8-GPU config, overridden to 2 CPU processes in fp32
(gloo), trains what one process does with --grad-accum 2: FastComposer and Subject-Diffusion on ToyWorld and on
built shards through the streaming reader, Custom Diffusion's `learn`; a run stopped by the main process's
checkpoint and resumed by both; logs and files from the main process only. One launch runs every case
(tests/two_process_runs.py), so the processes start once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from two_process_runs import out_args, runs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
DDP = CONFIGS / "ddp-8gpu-bf16.yaml"
# what turns the shipped 1 node x 8 GPUs bf16 file into this machine's 2 CPU processes in fp32. Not `--cpu`:
# accelerate's --cpu takes its single-process launcher (several CPU processes only through mpirun), while the
# file's multi-GPU launcher (torchrun) with ACCELERATE_USE_CPU starts 2 processes that pair up over gloo.
OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no"]
CPU = {"ACCELERATE_USE_CPU": "true"}
ATOL = 1e-5  # 3 AdamW steps; the two sides differ only in the order gradients are summed
CASES = ["fc-toyworld", "fc-shards", "sd-toyworld", "sd-shards", "cd-learn"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from multiconcept.datasets.filters import PROFILES
    from multiconcept.datasets.pipeline import StageSpec
    from multiconcept.datasets.toyworld import write_toyworld_source
    from multiconcept.workflows.dataset import BuildSettings, build

    root = tmp_path_factory.mktemp("shards")
    write_toyworld_source(root / "src", 24, seed=5, per_shard=8)
    build(root / "src", root / "ds", BuildSettings(stages=StageSpec(filters=PROFILES["toyworld"]).all_toyworld()))
    return str(root / "ds")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    a = np.full((32, 32, 3), 128, np.uint8)
    a[4:14, 4:14] = (230, 30, 30)
    a[18:30, 18:30] = (30, 30, 230)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(a).save(path)
    return str(path)


@pytest.fixture(scope="module")
def two(tmp_path_factory, shards, image, free_port):
    """Every case once on 2 processes at --grad-accum 1: (work folder, stdout)."""
    work = tmp_path_factory.mktemp("two")
    env = {**os.environ, **CPU, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(DDP), *OVERRIDES,
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "two_process_runs.py"), str(work), shards, image]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done.stdout


def tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def sample_log(folder: Path) -> dict[tuple[int, int], list[str]]:
    """(step, micro) -> sample keys; a step logged twice (redone after a resume) keeps its last record."""
    lines = map(json.loads, (folder / "samples.jsonl").read_text().splitlines())
    return {(r["step"], r["micro"]): r["keys"] for r in lines}


@pytest.fixture(scope="module")
def one(tmp_path_factory, shards, image):
    """name -> the same case's output, one process at --grad-accum 2 (in this process)."""
    from multiconcept import cli

    work, done = tmp_path_factory.mktemp("one"), {}

    def get(name):
        if name not in done:
            sys_argv = sys.argv
            sys.argv = ["multiconcept", *runs(work, shards, image, grad_accum=2)[name], *out_args(work, name)]
            try:
                cli.main()
            except SystemExit as e:
                assert not e.code, f"{name} exited {e.code}"
            finally:
                sys.argv = sys_argv
            done[name] = work / (f"{name}.safetensors" if name.startswith("cd-") else name)
        return done[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_two_processes_train_what_one_does_accumulating_two(two, one, name):
    work, _ = two
    a, b = tensors(one(name)), tensors(work / out_args(work, name)[1].split("/")[-1])
    assert a.keys() == b.keys() and len(a) > 0
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    assert worst <= ATOL, f"{name}: trained tensors differ by {worst}"
    if name.endswith("-shards"):
        # micro-batch m·P + r went to rank r: every (step, micro) holds the samples one process gave it
        assert sample_log(work / name) == sample_log(one(name))


def test_the_trained_weights_moved_so_the_comparison_can_fail(two, one):
    from multiconcept.models import load_base

    base = load_base("tiny")
    trained = load_file(str(one("fc-toyworld") / "unet.safetensors"))
    moved = max((trained[k] - v).abs().max().item() for k, v in base.unet.state_dict().items() if k in trained)
    assert moved > 100 * ATOL


def test_a_run_the_main_process_checkpointed_resumes_on_both(two, one):
    work, _ = two
    a, b = tensors(one("fc-shards")), tensors(work / "fc-resumed")
    assert max((x - b[k]).abs().max().item() for k, x in a.items()) <= ATOL
    assert sample_log(work / "fc-resumed") == sample_log(one("fc-shards"))
    assert not (work / "fc-resumed" / "checkpoint.safetensors").exists()


def test_only_the_main_process_speaks_and_writes(two):
    work, stdout = two
    assert stdout.count("wrote ") == len(CASES) + 1  # one line per run, not one per process
    log = (work / "sd-shards" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 3 and all(json.loads(line)["skipped"] == 0 for line in log)


def test_shipped_configs_are_read_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(DDP))
    assert (ddp.distributed_type.value, ddp.num_processes, ddp.num_machines, ddp.mixed_precision) == \
        ("MULTI_GPU", 8, 1, "bf16")
    for name, kind in (("deepspeed-zero2-8gpu-bf16.yaml", "DEEPSPEED"), ("fsdp-8gpu-bf16.yaml", "FSDP")):
        cfg = load_config_from_file(str(CONFIGS / name))
        assert cfg.distributed_type.value == kind and cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
        assert (CONFIGS / name).read_text().startswith("# NOT RUN HERE")
    assert load_config_from_file(str(CONFIGS / "deepspeed-zero2-8gpu-bf16.yaml")).deepspeed_config["zero_stage"] == 2
