"""params.yaml validation: bad values fail before any work, naming key, value and rule; the
sections must all be there and agree with each other."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from clipshift.config import (
    READS_WHAT_WRITES,
    SECTIONS,
    DistributedConfig,
    PipelineConfig,
    ValidateConfig,
    load_params,
)
from clipshift.errors import ConfigError
from tests.conftest import REPO
from tests.tiny import full_params


def write_params(tmp_path, overrides: dict[str, Any]) -> str:
    """The repository's params.yaml with ``overrides`` merged in."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(full_params(overrides)))
    return str(path)


def load_error(tmp_path, overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, overrides))
    return str(err.value)


def test_repository_params_file_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    on_disk = yaml.safe_load((REPO / "params.yaml").read_text())
    # every knob is in params.yaml, not only in code defaults
    assert (
        set(on_disk)
        == set(SECTIONS)
        == {
            "fetch",
            "validate",
            "pretrain",
            "supervised",
            "finetune",
            "interpolate",
            "evaluate",
            "scaling",
            "report",
        }
    )
    assert params.model_dump(by_alias=True, mode="json") == on_disk


def test_alpha_out_of_range_names_key_value_and_rule(tmp_path):
    msg = load_error(tmp_path, {"interpolate": {"alphas": [0.0, 0.5, 1.5]}})
    assert "interpolate.alphas" in msg and "1.5" in msg and "[0, 1]" in msg


def test_unknown_key_is_rejected_with_its_dotted_name(tmp_path):
    msg = load_error(tmp_path, {"pretrain": {"batchsize": 64}})
    assert "unknown key 'pretrain.batchsize'" in msg


def test_wrong_type_names_the_value(tmp_path):
    msg = load_error(tmp_path, {"fetch": {"world": {"image_size": "big"}}})
    assert "fetch.world.image_size" in msg and "'big'" in msg


def test_reference_style_cannot_be_a_shift(tmp_path):
    msg = load_error(tmp_path, {"fetch": {"world": {"shift_styles": ["twemoji", "fluent"]}}})
    assert "reference style 'twemoji'" in msg


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="not found; run from the repository root"):
        load_params(tmp_path / "nope.yaml")


def test_templates_need_a_class_slot(tmp_path):
    assert "finetune.templates" in load_error(tmp_path, {"finetune": {"templates": ["a photo"]}})


def test_params_round_trip_through_yaml():
    params = load_params(REPO / "params.yaml")
    dumped = params.model_dump(by_alias=True, mode="json")
    assert PipelineConfig.model_validate(dumped) == params


def test_unknown_model_name_is_rejected_with_examples(tmp_path):
    msg = load_error(tmp_path, {"pretrain": {"model": "ViT-Q-99"}})
    assert "pretrain.model" in msg and "not an open_clip architecture" in msg


def test_known_open_clip_name_is_accepted(tmp_path):
    path = write_params(tmp_path, {"pretrain": {"model": "ViT-B-32"}})
    assert load_params(path).pretrain.model == "ViT-B-32"


def test_missing_checkpoint_path_is_named(tmp_path):
    assert "nowhere/ckpt.pt" in load_error(
        tmp_path, {"pretrain": {"init_checkpoint": "nowhere/ckpt.pt"}}
    )


# --------------------------------------------------------------------------------------------
# every section is in the file; the validate section's alias is mapped in one place


def test_a_missing_section_is_named_not_filled_with_class_defaults(tmp_path):
    data = full_params()
    del data["evaluate"], data["validate"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "missing section 'evaluate'" in str(err.value)
    assert "missing section 'validate'" in str(err.value)  # its params.yaml name, not validate_


def test_sections_are_found_by_their_params_yaml_names():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params.section("validate"), ValidateConfig)
    assert all(isinstance(params.section(name), model) for name, model in SECTIONS.items())
    assert params.value("validate.out_dir") == params.validate_.out_dir
    with pytest.raises(ConfigError, match="no section 'validate_'"):
        params.section("validate_")


# --------------------------------------------------------------------------------------------
# one distributed-settings model


def test_distributed_settings_are_one_model_in_three_sections():
    params = load_params(REPO / "params.yaml")
    for name in ("pretrain", "finetune", "evaluate"):
        section = params.section(name)
        assert isinstance(section.distributed, DistributedConfig), name
        assert not {"nproc_per_node", "nnodes"} & set(type(section).model_fields), name
    # rank counts cannot change trained weights (the world size enters the training spec)
    assert "distributed" in params.pretrain.RESULT_NEUTRAL
    assert "distributed" in params.finetune.RESULT_NEUTRAL


def test_old_rank_keys_say_where_they_moved(tmp_path):
    msg = load_error(tmp_path, {"finetune": {"nproc_per_node": 2}})
    assert "'finetune.nproc_per_node' has moved: it is 'finetune.distributed.nproc_per_node'" in msg


def test_several_nodes_need_a_rendezvous_endpoint(tmp_path):
    msg = load_error(tmp_path, {"evaluate": {"distributed": {"nnodes": 2}}})
    assert "'evaluate.distributed'" in msg and "nnodes=2 needs rdzv_endpoint" in msg
    ok = {"nnodes": 2, "rdzv_endpoint": "node0.example:29400"}
    params = load_params(write_params(tmp_path, {"evaluate": {"distributed": ok}}))
    assert params.evaluate.distributed.world_size == 2
    msg = load_error(tmp_path, {"evaluate": {"distributed": {"rdzv_endpoint": "no-port"}}})
    assert "evaluate.distributed.rdzv_endpoint" in msg


# --------------------------------------------------------------------------------------------
# checks across sections: each names both keys and the fix


@pytest.mark.parametrize("reader,writer", READS_WHAT_WRITES)
def test_a_stage_reads_the_folder_the_earlier_one_writes(tmp_path, reader, writer):
    section, key = reader.split(".")
    msg = load_error(tmp_path, {section: {key: "somewhere/else"}})
    written = load_params(REPO / "params.yaml").value(writer)
    assert f"{reader} = 'somewhere/else' but {writer} = '{written}'" in msg
    assert f"set {reader} to '{written}'" in msg


def test_moving_a_folder_with_its_readers_is_fine(tmp_path):
    data = "elsewhere/fetch"
    readers = {
        r.split(".")[0]: {"data_dir": data} for r, w in READS_WHAT_WRITES if w == "fetch.out_dir"
    }
    sheet = {"contact_sheet": data + "/card/contact_sheet.png"}  # the report embeds it
    overrides = {**readers, "fetch": {"out_dir": data + "/"}, "report": sheet}
    params = load_params(write_params(tmp_path, overrides))
    assert params.scaling.data_dir == data


@pytest.mark.parametrize("key", ["finetune", "interpolate", "supervised"])
def test_evaluate_reads_the_models_under_models_dir(tmp_path, key):
    overrides: dict[str, Any] = {key: {"out_dir": "results/" + key}}
    if key == "finetune":  # keep interpolate reading what finetune writes
        overrides["interpolate"] = {"finetune_dir": "results/finetune"}
    msg = load_error(tmp_path, overrides)
    assert (
        f"{key}.out_dir = 'results/{key}' is not a folder directly under evaluate.models_dir" in msg
    )
    assert f"set {key}.out_dir to 'models/{key}'" in msg


def test_finetune_pool_must_be_pretrained(tmp_path):
    """The reported case: `finetune.pool: wide` passed check-params and failed after pretraining."""
    msg = load_error(tmp_path, {"finetune": {"pool": "wide"}})
    assert "finetune.pool = 'wide' is not in pretrain.pools ['diverse', 'narrow']" in msg
    assert "add 'wide' to pretrain.pools" in msg


@pytest.mark.parametrize("key", ["pretrain", "scaling"])
def test_pools_must_be_ones_fetch_builds(tmp_path, key):
    msg = load_error(tmp_path, {key: {"pools": ["diverse", "wide"]}})
    assert f"{key}.pools lists ['wide'], which fetch does not build" in msg
    assert "named 'pool-wide'" in msg
    source = {"name": "pool-wide", "uri": "s3://bucket/wide/{00000..00009}.tar", "role": "pool"}
    params = load_params(
        write_params(
            tmp_path, {key: {"pools": ["diverse", "wide"]}, "fetch": {"sources": [source]}}
        )
    )
    assert "wide" in params.section(key).pools


def test_without_any_pool_fetch_serves_evaluation_only(tmp_path):
    """fetch.use_world: false and no pool source: the README's ImageNet evaluation setup."""
    source = {"name": "imagenet-val", "uri": "s3://bucket/val/", "role": "test"}
    path = write_params(tmp_path, {"fetch": {"use_world": False, "sources": [source]}})
    assert load_params(path).pretrain.pools == ["diverse", "narrow"]


def test_pretrain_batch_must_split_over_ranks_and_accumulation(tmp_path):
    three = {"batch_size": 128, "accum_steps": 2, "distributed": {"nproc_per_node": 3}}
    msg = load_error(tmp_path, {"pretrain": three})
    assert "pretrain.batch_size = 128 does not split into pretrain.accum_steps (2) × " in msg
    assert "pretrain.distributed ranks (3 = nproc_per_node × nnodes)" in msg
    assert "divisible by 6" in msg
    overrides = {"pretrain": {"accum_steps": 3, "batch_size": 129}, "scaling": {"batch_size": 64}}
    msg = load_error(tmp_path, overrides)
    assert "scaling.batch_size = 64 does not split into pretrain.accum_steps (3)" in msg
    # unset, the scaling runs take pretrain's batch, which already splits
    load_params(write_params(tmp_path, {"pretrain": {"accum_steps": 3, "batch_size": 129}}))


def test_a_run_needs_at_least_one_batch(tmp_path):
    msg = load_error(tmp_path, {"pretrain": {"samples": 64}})
    assert "pretrain.samples = 64 is less than one batch (pretrain.batch_size = 128)" in msg
    grid = [{"width": 32, "layers": 1, "samples": s} for s in (32, 640, 6400)]
    msg = load_error(tmp_path, {"scaling": {"grid": grid}})
    assert "scaling.grid has runs of [32] samples, less than one batch" in msg


def test_source_names_are_unique_and_not_the_worlds(tmp_path):
    sources = [
        {"name": "test", "uri": "s3://b/test/", "role": "test"},
        {"name": "extra", "uri": "s3://b/a/"},
        {"name": "extra", "uri": "s3://b/b/"},
    ]
    msg = load_error(tmp_path, {"fetch": {"sources": sources}})
    assert "'fetch': fetch.sources names must be unique" in msg
    assert "listed twice: ['extra']" in msg and "built by the world too: ['test']" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    msg = load_error(tmp_path, {"finetune": {"pool": "wide", "pretrain_dir": "x"}})
    assert "finetune.pool = 'wide'" in msg and "finetune.pretrain_dir = 'x'" in msg


def test_report_merges_the_metrics_files_evaluate_and_scaling_write(tmp_path):
    msg = load_error(tmp_path, {"evaluate": {"metrics_path": "out/evaluate.json"}})
    assert "evaluate.metrics_path = 'out/evaluate.json' is not in report.sources" in msg
    both = {"metrics_path": "out/scaling.json"}
    sources = {"sources": ["metrics/evaluate.json", "./out/scaling.json"]}
    params = load_params(write_params(tmp_path, {"scaling": both, "report": sources}))
    assert params.report.sources[1] == "./out/scaling.json"


def test_evaluate_bootstrap_and_chance_multiple_are_bounded(tmp_path):
    assert "evaluate.bootstrap" in load_error(tmp_path, {"evaluate": {"bootstrap": 5}})
    msg = load_error(tmp_path, {"evaluate": {"baseline_min_chance_multiple": -1}})
    assert "evaluate.baseline_min_chance_multiple" in msg
