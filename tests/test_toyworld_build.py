"""The ToyWorld build's resume guard: a work dir only continues under the settings it was started with."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from multiconcept.toyworld.build import BuildConfig, _check_state


def test_a_work_dir_resumes_only_with_its_own_settings(tmp_path):
    _check_state(tmp_path, BuildConfig(), resume=True)
    _check_state(tmp_path, BuildConfig(unet_steps=99, threads=1), resume=True)  # runtime fields may change
    with pytest.raises(ValueError, match="vae_lr"):
        _check_state(tmp_path, BuildConfig(vae_lr=1.0), resume=True)


def test_a_work_dir_from_before_a_setting_existed_keeps_its_old_behaviour(tmp_path):
    old = {k: v for k, v in asdict(BuildConfig()).items() if k != "text_encoder"}
    (tmp_path / "state.json").write_text(json.dumps({"config": old}))
    with pytest.raises(ValueError, match="text_encoder"):
        _check_state(tmp_path, BuildConfig(), resume=True)  # the new default differs from what it was built with
    _check_state(tmp_path, BuildConfig(text_encoder="scratch"), resume=True)
