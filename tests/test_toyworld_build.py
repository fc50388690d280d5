"""The ToyWorld build's resume guard: a work dir only continues under the settings it was started with."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from multiconcept.toyworld.build import BuildConfig, _check_state, make_schedulers


def test_a_work_dir_resumes_only_with_its_own_settings(tmp_path):
    _check_state(tmp_path, BuildConfig(), resume=True)
    _check_state(tmp_path, BuildConfig(unet_steps=99, threads=1), resume=True)  # runtime fields may change
    with pytest.raises(ValueError, match="vae_lr"):
        _check_state(tmp_path, BuildConfig(vae_lr=1.0), resume=True)


@pytest.mark.parametrize("field, old_value", [("text_encoder", "scratch"), ("prediction_type", "epsilon")])
def test_a_work_dir_from_before_a_setting_existed_keeps_its_old_behaviour(tmp_path, field, old_value):
    old = {k: v for k, v in asdict(BuildConfig()).items() if k != field}
    (tmp_path / "state.json").write_text(json.dumps({"config": old}))
    with pytest.raises(ValueError, match=field):
        _check_state(tmp_path, BuildConfig(), resume=True)  # the new default differs from what it was built with
    _check_state(tmp_path, BuildConfig(**{field: old_value}), resume=True)


@pytest.mark.parametrize("prediction_type, first, last", [("v_prediction", 999, 32), ("epsilon", 958, 1)])
def test_the_build_samples_where_its_unet_was_trained(prediction_type, first, last):
    # v-prediction pairs with "trailing" timesteps so sampling starts at pure noise (t = 999);
    # epsilon runs keep their old "leading" spacing, so resumed old builds sample as before.
    train, sample = make_schedulers(prediction_type)
    assert train.config.prediction_type == sample.config.prediction_type == prediction_type
    sample.set_timesteps(30)
    assert (int(sample.timesteps[0]), int(sample.timesteps[-1])) == (first, last)
