"""params.yaml validation: bad values fail before any work, naming key, value and rule."""

from __future__ import annotations

import pytest
import yaml

from clipshift.config import PipelineConfig, load_params
from clipshift.errors import ConfigError
from tests.conftest import REPO


def write_params(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_repository_params_file_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    on_disk = yaml.safe_load((REPO / "params.yaml").read_text())
    # every knob is in params.yaml, not only in code defaults
    assert set(on_disk) == {
        "fetch",
        "validate",
        "pretrain",
        "finetune",
        "interpolate",
        "evaluate",
        "scaling",
    }
    assert params.model_dump(by_alias=True, mode="json") == on_disk


def test_alpha_out_of_range_names_key_value_and_rule(tmp_path):
    path = write_params(tmp_path, {"interpolate": {"alphas": [0.0, 0.5, 1.5]}})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "interpolate.alphas" in msg and "1.5" in msg and "[0, 1]" in msg


def test_unknown_key_is_rejected_with_its_dotted_name(tmp_path):
    path = write_params(tmp_path, {"pretrain": {"batchsize": 64}})
    with pytest.raises(ConfigError, match=r"unknown key 'pretrain.batchsize'"):
        load_params(path)


def test_wrong_type_names_the_value(tmp_path):
    path = write_params(tmp_path, {"fetch": {"world": {"image_size": "big"}}})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "fetch.world.image_size" in str(err.value) and "'big'" in str(err.value)


def test_reference_style_cannot_be_a_shift(tmp_path):
    path = write_params(tmp_path, {"fetch": {"world": {"shift_styles": ["twemoji", "fluent"]}}})
    with pytest.raises(ConfigError, match="reference style 'twemoji'"):
        load_params(path)


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="not found; run from the repository root"):
        load_params(tmp_path / "nope.yaml")


def test_templates_need_a_class_slot(tmp_path):
    path = write_params(tmp_path, {"finetune": {"templates": ["a photo"]}})
    with pytest.raises(ConfigError, match="finetune.templates"):
        load_params(path)


def test_defaults_round_trip_through_yaml():
    dumped = PipelineConfig().model_dump(by_alias=True, mode="json")
    assert PipelineConfig.model_validate(dumped) == PipelineConfig()


def test_unknown_model_name_is_rejected_with_examples(tmp_path):
    path = write_params(tmp_path, {"pretrain": {"model": "ViT-Q-99"}})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "pretrain.model" in str(err.value) and "not an open_clip architecture" in str(err.value)


def test_known_open_clip_name_is_accepted(tmp_path):
    path = write_params(tmp_path, {"pretrain": {"model": "ViT-B-32"}})
    assert load_params(path).pretrain.model == "ViT-B-32"


def test_missing_checkpoint_path_is_named(tmp_path):
    path = write_params(tmp_path, {"pretrain": {"init_checkpoint": "nowhere/ckpt.pt"}})
    with pytest.raises(ConfigError, match="nowhere/ckpt.pt"):
        load_params(path)
