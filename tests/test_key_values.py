"""`hf_clinic.key_values.parse_key_values`: the one parser behind `--set`, `--threshold` and `--clip_args`."""

import pytest

from hf_clinic.key_values import parse_key_values


def test_values_are_json_where_they_parse_and_strings_otherwise():
    expected = {"z_thresh": 2.5, "warmup_steps": 10, "name": "x", "on": True, "off": None}
    text = "z_thresh=2.5, warmup_steps=10,name = x,on=true,off=null,"
    assert parse_key_values(text, option="--clip_args") == expected
    items = ["z_thresh=2.5", "warmup_steps=10", "name=x", "on=true", "off=null"]
    assert parse_key_values(items, option="--set") == expected
    assert list(parse_key_values(items, option="--set")) == ["z_thresh", "warmup_steps", "name", "on", "off"]


def test_a_value_may_contain_an_equals_sign_and_a_list():
    assert parse_key_values(["expr=a=b", "ids=[1, 2]"], option="--set") == {"expr": "a=b", "ids": [1, 2]}


@pytest.mark.parametrize("empty", [None, "", [], ","])
def test_nothing_given_is_no_settings(empty):
    assert parse_key_values(empty, option="--set") == {}


@pytest.mark.parametrize(
    "given, message",
    [
        ("z_thresh", "Invalid --clip_args setting 'z_thresh'; expected key=value"),
        ("=3", "Invalid --clip_args setting '=3'; the key is empty"),
        ("z_thresh=2.5,z_thresh=3", "--clip_args: 'z_thresh' is given twice"),
        (["a=1", " a =2"], "--clip_args: 'a' is given twice"),
    ],
)
def test_bad_settings_are_refused_by_name(given, message):
    with pytest.raises(ValueError) as error:
        parse_key_values(given, option="--clip_args")
    assert message in str(error.value)
