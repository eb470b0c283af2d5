"""Validation: every kind of bad input ends in one line naming the bad value and the allowed ones."""

from __future__ import annotations

import json

import pytest

from conftest import compose as job
from falcon_exp.cli import check_group_overrides
from falcon_exp.config import flatten
from falcon_exp.errors import ConfigError
from falcon_exp.prompts import read_prompts_file


def test_defaults_compose_to_the_packaged_model_and_the_articles_prompts():
    config = job()
    assert config.model.name == "smollm2-135m-instruct" and config.model.weights == "packaged"
    assert config.prompts.name == "seed_en" and len(config.prompts.items) == 5
    assert config.prompts.items[4] == "What are the steps to perform an A/B test?"
    assert (config.quantization.settings.quant_type, config.quantization.settings.compute_dtype) == ("nf4", "bfloat16")
    assert config.bits == 4 and config.flat["bits"] == 4 and config.flat["quantization.bitsandbytes.int8_threshold"] == 6.0
    assert config.flat["prompts.name"] == "seed_en" and config.flat["model.name"] == "smollm2-135m-instruct"


def test_modes_are_named_by_what_they_are():
    assert job("bits=4").mode == "nf4"
    assert job("bits=4", "quantization.bitsandbytes.quant_type=fp4").mode == "fp4"
    assert job("bits=8").mode == "int8"
    assert job("bits=16").mode == "bf16"
    assert job("bits=16", "dtype=float32").mode == "fp32"
    assert job("bits=4", "quantization.backend=torchao").mode == "ao-int4"
    assert job("bits=8", "quantization.backend=torchao", "quantization.torchao.eight_bit=float8").scheme == "float8_weight_only"
    assert (job("bits=4", "quantization.backend=hqq").mode, job("bits=8", "quantization.backend=hqq").scheme) == ("hqq4", "hqq_8bit")


def test_a_run_logs_its_own_backends_settings_alone():
    """A backend's settings are params of its runs only: an hqq run has no bitsandbytes quant_type."""
    hqq = job("bits=4", "quantization.backend=hqq", "quantization.hqq.group_size=32").flat
    assert {k: v for k, v in hqq.items() if k.startswith("quantization.")} == {
        "quantization.backend": "hqq", "quantization.from_checkpoint": False, "quantization.hqq.group_size": 32, "quantization.hqq.axis": 1}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["bits=3"], "bits=3 is not allowed; choose one of: 4, 8, 16"),
        (["quantization.bitsandbytes.quant_type=int4"], "quantization.bitsandbytes.quant_type='int4' is not allowed; choose one of: nf4, fp4"),
        (["quantization.bitsandbytes.compute_dtype=half"], "quantization.bitsandbytes.compute_dtype='half' is not allowed"),
        (["quantization.bitsandbytes.int8_threshold=-1"], "quantization.bitsandbytes.int8_threshold=-1 is not allowed"),
        (["quantization.backend=gguf"], "quantization.backend='gguf' is not allowed; choose one of: bitsandbytes, torchao, hqq, marlin"),
        (["quantization.hqq.axis=2"], "quantization.hqq.axis=2 is not allowed; choose one of: 0, 1"),
        (["quantization.marlin.group_size=0"], "quantization.marlin.group_size=0 is not allowed; choose one of: 32, 64, 128, -1"),
        (["quantization.torchao.group_size=48"], "quantization.torchao.group_size=48 is not allowed; choose one of: 32, 64, 128"),
        (["device=tpu"], "device='tpu' is not allowed; choose one of: auto, cpu, cuda"),
        (["max_new_tokens=8"], "set exactly one of them"),
        (["max_length=null"], "set exactly one of them"),
        (["max_length=0"], "max_length=0 is not allowed"),
        (["repetitions=0"], "repetitions=0 is not allowed"),
        (["prompts.items=[]"], "holds no prompts"),
        (["prompts.items=['',x]"], "is not a prompt"),
        (["model.weights=magic"], "model.weights='magic' is not allowed; choose one of: packaged, hub, synthetic"),
        (["model=tiny-falcon", "model.architecture=falcon-1t"], "model.architecture='falcon-1t' is not allowed"),
        (["force_length=maybe"], "force_length='maybe' is not allowed; choose true or false"),
        (["repetitions=2.5"], "repetitions=2.5 is not allowed; it must be an integer >= 1"),
        (["+colour=red"], "config.colour is not a key of config"),
        (["model=tiny-falcon", "model.path=/tmp"], "model.path='/tmp' is not read by synthetic weights (model=tiny-falcon"),
        (["max_memory=foo"], "max_memory='foo' is not allowed; give null, or a mapping of devices"),
        (["max_memory={0: lots}"], "max_memory={0: 'lots'} is not allowed: 0: 'lots'"),
        (["max_memory={gpu: 70GiB}"], "max_memory={'gpu': '70GiB'} is not allowed: 'gpu': '70GiB'"),
        (["bits=4.0"], "bits='4.0' is not allowed; choose one of: 4, 8, 16"),  # the command line writes it as 4 first
    ],
)
def test_bad_values_fail_with_one_line_naming_them(overrides, message):
    with pytest.raises(ConfigError) as raised:
        job(*overrides)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_unknown_group_choice_names_the_choices():
    with pytest.raises(ConfigError, match=r"model='nope' is not allowed; choose one of: .*tiny-falcon"):
        check_group_overrides(["-m", "model=tiny-falcon,nope"])
    check_group_overrides(["model=tiny-falcon", "prompts=seed_zh", "bits=4,8"])


def test_prompt_files_yaml_and_jsonl(tmp_path):
    (tmp_path / "a.yaml").write_text("prompts:\n  - one\n  - two\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "uno"}\n\n{"prompt": "dos"}\n')
    assert read_prompts_file(tmp_path / "a.yaml") == ["one", "two"]
    assert read_prompts_file(tmp_path / "b.jsonl") == ["uno", "dos"]
    config = job(f"prompts.file={tmp_path / 'b.jsonl'}")
    assert config.prompts.name == "b" and config.prompts.items == ("uno", "dos")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"prompt": "x"\n', "is malformed"),
        ("second.jsonl", '{"prompt": "x"}\n\n{"prompt": y}\n', "is malformed: line 3: Expecting value \\(column 12\\)$"),
        ("surrogate.jsonl", '{"prompt": "a\\ud800"}\n', "entry 0 is not valid Unicode text: '\\\\ud800' at character 1 is half of a surrogate"),
        ("bad.yaml", "a: [1,\n", "is malformed"),
        ("empty.yaml", "[]\n", "holds no prompts"),
        ("numbers.yaml", "- 1\n- 2\n", "is not a prompt"),
        ("python.yaml", "!!python/object/apply:os.system ['true']\n", "is malformed"),
        ("prompts.txt", "hello\n", "unknown suffix"),
    ],
)
def test_malformed_prompt_files_are_refused_as_data(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_prompts_file(tmp_path / name)


def test_a_model_path_replaces_the_packaged_default(tmp_path):
    config = job(f"model.path={tmp_path}")
    assert config.model.weights == "hub" and config.model.name == tmp_path.name


def test_flatten_makes_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": []}) == {"a.b": 1, "a.c.d": None, "e": []}


def test_load_order_puts_the_keys_that_shape_weights_first_and_keeps_the_rest_in_order():
    from falcon_exp.cli import load_order

    given = ["-m", "max_length=40,48", "prompts=seed_zh", "bits=4,8", "quantization.bitsandbytes.quant_type=nf4,fp4", "model=tiny-falcon"]
    assert load_order(given) == [
        "-m", "bits=4,8", "quantization.bitsandbytes.quant_type=nf4,fp4", "model=tiny-falcon", "max_length=40,48", "prompts=seed_zh"
    ]
    assert load_order(["--cfg", "job", "max_length=9", "seed=1"]) == ["--cfg", "job", "seed=1", "max_length=9"]


def test_a_length_the_model_cannot_hold_fails_as_the_job_resolves():
    from conftest import resolve_job

    with pytest.raises(ConfigError, match="max_length=4 leaves no room to generate"):
        resolve_job("model=tiny-falcon", "max_length=4")


def test_memory_caps_as_accelerate_takes_them_pass():
    assert job("max_memory={0: 70GiB, 1: 70000000000, cpu: 100GB, disk: 1TiB}").max_memory == {0: "70GiB", 1: 70000000000, "cpu": "100GB",
                                                                                               "disk": "1TiB"}


def test_the_command_line_writes_bits_as_integers_and_refuses_settings_beside_from_checkpoint():
    from falcon_exp.cli import check_checkpoint_overrides, integral_bits

    assert integral_bits(["-m", "bits=4.0,8", "max_length=60.0", "--cfg", "job"]) == ["-m", "bits=4,8", "max_length=60.0", "--cfg", "job"]
    for given in (["quantization.from_checkpoint=true", "bits=8"],
                  ["-m", "quantization.from_checkpoint=false,True", "quantization.bitsandbytes.quant_type=fp4"]):
        with pytest.raises(ConfigError, match=r"^(bits=8|quantization.bitsandbytes.quant_type=fp4) beside quantization.from_checkpoint=true: the"):
            check_checkpoint_overrides(given)
    check_checkpoint_overrides(["quantization.from_checkpoint=true", "model.path=ckpt", "max_length=60"])
    check_checkpoint_overrides(["quantization.from_checkpoint=false", "bits=8"])


def test_a_prompt_longer_than_the_context_is_named_as_such(tmp_path):
    from conftest import resolve_job

    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 3000}) + "\n")
    with pytest.raises(ConfigError, match=r"^prompt 1 of prompts=long is 3001 tokens, as long as tiny-falcon's context of 2048 tokens"):
        resolve_job("model=tiny-falcon", f"prompts.file={tmp_path / 'long.jsonl'}", "max_length=null", "max_new_tokens=2")


@pytest.mark.parametrize("text, message", [("{bad", "holds a config.json that is not JSON"), ("[1]", "holds a config.json that is a list")])
def test_a_model_folder_whose_config_is_not_a_models_is_refused_in_one_line(tmp_path, text, message):
    from conftest import resolve_job

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"^model.path='{tmp_path}' {message}"):
        resolve_job(f"model.path={tmp_path}")
