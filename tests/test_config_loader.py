import argparse
import dataclasses
import math
from typing import Literal

import pytest
import yaml

from fusion_jax.config.loader import ConfigError, add_config_arguments, apply_overrides, config_from_args, describe, from_dict, load, to_dict


@dataclasses.dataclass(frozen=True)
class Attn:
    kind: Literal["dot", "flash", "splash"] = "dot"
    num_heads: int = dataclasses.field(default=4, metadata={"help": "Number of heads.\nMore detail."})
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Model:
    hidden: int = 64
    attn: Attn = dataclasses.field(default_factory=Attn)
    dims: tuple[int, ...] = (1, 2)
    pair: tuple[str, float] = ("a", 1.0)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    name: str | None = None

    def validate(self):
        if self.hidden % self.attn.num_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by attn.num_heads={self.attn.num_heads}")


@dataclasses.dataclass(frozen=True)
class Run:
    lr: float = 1e-3
    steps: int = 10
    debug: bool = False
    tag: str = "base"
    model: Model = dataclasses.field(default_factory=Model)


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    retries: int = 0


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(fn, *args, **kwargs):
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --- construction and round trip ---------------------------------------------------------------

def test_defaults():
    assert from_dict(Run, {}) == Run()
    assert load(Run, None) == Run()
    assert load(Run, None).model.attn.num_heads == 4


def test_nested_and_collections():
    run = from_dict(Run, {
        "lr": 1,  # int accepted for float
        "model": {"attn": {"kind": "flash", "num_heads": 8}, "dims": [3, 4, 5], "pair": ["b", 2],
                  "extra": {"x": 0.5}, "name": "m"},
    })
    assert run.lr == 1.0 and isinstance(run.lr, float)
    assert run.model.attn == Attn(kind="flash", num_heads=8)
    assert run.model.dims == (3, 4, 5)
    assert run.model.pair == ("b", 2.0)
    assert run.model.extra == {"x": 0.5}
    assert run.model.name == "m"
    assert run.steps == 10  # untouched defaults survive alongside set keys


def test_round_trip_through_yaml(tmp_path):
    run = Run(lr=3e-4, steps=7, debug=True, tag="t",
              model=Model(hidden=96, attn=Attn("splash", 3, 0.1), dims=(), pair=("z", -1.5),
                          extra={"a": 1.0}, name="n"))
    data = to_dict(run)
    assert data["model"]["dims"] == [] and data["model"]["pair"] == ["z", -1.5]
    assert from_dict(Run, data) == run
    assert load(Run, write(tmp_path, yaml.safe_dump(data))) == run


def test_load_file_with_scientific_float(tmp_path):
    path = write(tmp_path, "lr: 1e-5\nsteps: 3\nmodel:\n  attn:\n    kind: splash\n")
    run = load(Run, path)
    assert run.lr == 1e-5 and run.steps == 3 and run.model.attn.kind == "splash"


# --- validation errors -------------------------------------------------------------------------

def test_literal_error_names_key_file_choices_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  attn:\n    kind: flsh\n")
    msg = error(load, Run, path)
    assert "model.attn.kind" in msg
    assert path in msg
    assert "'dot', 'flash', 'splash'" in msg
    assert "did you mean 'flash'?" in msg


def test_unknown_key_lists_valid_keys_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  hiden: 32\n")
    msg = error(load, Run, path)
    assert "model.hiden" in msg and "unknown key" in msg and path in msg
    assert "hidden, attn, dims, pair, extra, name" in msg
    assert "did you mean 'hidden'?" in msg


@pytest.mark.parametrize("value, got", [(True, "True (bool)"), ("8", "'8' (str)"), (2.5, "2.5 (float)")])
def test_wrong_type_for_int(value, got):
    msg = error(from_dict, Run, {"model": {"attn": {"num_heads": value}}}, source="x.yaml")
    assert msg.startswith("model.attn.num_heads: expected int, got " + got)
    assert "x.yaml" in msg


def test_wrong_types_elsewhere():
    assert "expected float, got False (bool)" in error(from_dict, Run, {"lr": False})
    assert "expected str, got 3 (int)" in error(from_dict, Run, {"tag": 3})
    assert "model.dims[1]: expected int" in error(from_dict, Run, {"model": {"dims": [1, "x"]}})
    assert "expected 2 items" in error(from_dict, Run, {"model": {"pair": ["a"]}})
    assert "model.extra.k: expected float" in error(from_dict, Run, {"model": {"extra": {"k": "v"}}})
    assert "model: expected a mapping" in error(from_dict, Run, {"model": 5})


def test_missing_required():
    msg = error(from_dict, Job, {"retries": 2}, source="job.yaml")
    assert "name: missing required key (str)" in msg and "job.yaml" in msg
    assert from_dict(Job, {"name": "j"}) == Job("j")


def test_validate_hook_error_is_prefixed_with_section(tmp_path):
    path = write(tmp_path, "model:\n  hidden: 10\n")
    msg = error(load, Run, path)
    assert msg.startswith("model: hidden=10 must be divisible by attn.num_heads=4")
    assert path in msg


# --- overrides ---------------------------------------------------------------------------------

def test_override_value_parsing():
    data = apply_overrides({"model": {"hidden": 8}}, [
        "steps=3", "lr=1e-5", "debug=true", "model.dims=[5, 6]", "model.name=null",
        "model.attn.dropout=inf", "tag=123",
    ])
    assert data == {"steps": 3, "lr": 1e-5, "debug": True, "tag": 123,
                    "model": {"hidden": 8, "dims": [5, 6], "name": None, "attn": {"dropout": math.inf}}}
    run = from_dict(Run, data)
    assert run.lr == 1e-5 and run.steps == 3 and run.debug is True
    assert run.model.dims == (5, 6) and run.model.name is None and run.model.hidden == 8
    assert run.tag == "123"  # a string field takes the override text as written


def test_overrides_do_not_mutate_input_and_last_wins():
    base = {"model": {"attn": {"num_heads": 2}}}
    data = apply_overrides(base, ["model.attn.num_heads=4", "model.attn.num_heads=8"])
    assert base == {"model": {"attn": {"num_heads": 2}}}
    assert data["model"]["attn"]["num_heads"] == 8


def test_override_on_top_of_file(tmp_path):
    path = write(tmp_path, "steps: 5\nmodel:\n  hidden: 32\n")
    run = load(Run, path, ["model.attn.kind=flash", "steps=6"])
    assert (run.steps, run.model.hidden, run.model.attn.kind) == (6, 32, "flash")


def test_override_errors_name_set_not_file(tmp_path):
    path = write(tmp_path, "steps: 5\n")
    msg = error(load, Run, path, ["model.attn.kind=flsh"])
    assert "model.attn.kind" in msg and "--set model.attn.kind=flsh" in msg
    assert "did you mean 'flash'?" in msg and path not in msg

    msg = error(load, Run, path, ["model.hiden=3"])
    assert "model.hiden" in msg and "--set model.hiden=3" in msg and "did you mean 'hidden'?" in msg

    msg = error(load, Run, path, ["steps=true"])
    assert "steps: expected int, got True (bool)" in msg and "--set steps=true" in msg


def test_file_errors_do_not_blame_unrelated_overrides(tmp_path):
    path = write(tmp_path, "steps: x\n")
    msg = error(load, Run, path, ["lr=0.1"])
    assert path in msg and "--set" not in msg


@pytest.mark.parametrize("bad", ["steps", "=3", "model..hidden=3", ".x=1"])
def test_malformed_override(bad):
    msg = error(apply_overrides, {}, [bad])
    assert repr(bad) in msg and "--set key=value" in msg


def test_override_through_non_section():
    msg = error(apply_overrides, {"steps": 5}, ["steps.x=1"])
    assert "--set steps.x=1" in msg and "not a section" in msg


# --- files -------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "steps: 5\nmodel:\n  hidden: [1, 2\n  name: x\n")
    msg = error(load, Run, path)
    assert msg.startswith(path + ", line ") and "invalid YAML" in msg
    line = int(msg.split(", line ")[1].split(",")[0])
    assert 3 <= line <= 5


def test_non_mapping_top_level(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    msg = error(load, Run, path)
    assert path in msg and "top level must be a mapping" in msg and "list" in msg


def test_empty_file_means_defaults(tmp_path):
    assert load(Run, write(tmp_path, "")) == Run()


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert error(load, Run, path) == f"config file not found: {path}"


# --- argparse and describe ---------------------------------------------------------------------

def test_argparse_integration(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    path = write(tmp_path, "steps: 2\n")
    args = parser.parse_args(["--config", path, "--set", "steps=9", "--set", "model.attn.kind=dot"])
    assert args.overrides == ["steps=9", "model.attn.kind=dot"]
    assert config_from_args(Run, args).steps == 9
    assert parser.parse_args([]).overrides == []
    assert config_from_args(Run, parser.parse_args([])) == Run()


def test_describe_lists_dotted_keys():
    text = describe(Run)
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert list(lines) == ["lr", "steps", "debug", "tag", "model.hidden", "model.attn.kind",
                           "model.attn.num_heads", "model.attn.dropout", "model.dims", "model.pair",
                           "model.extra", "model.name"]
    assert "int = 4" in lines["model.attn.num_heads"]
    assert lines["model.attn.num_heads"].endswith("Number of heads.")
    assert "'dot' | 'flash' | 'splash' = \"dot\"" in text
    assert "str | None = null" in lines["model.name"]
    assert "tuple[int, ...] = [1, 2]" in lines["model.dims"]
    assert "name" in describe(Job) and "(required)" in describe(Job)


def test_partly_given_section_keeps_the_parents_default_instance():
    from fusion_jax.config.schema import ConvertConfig

    cfg = load(ConvertConfig, None, ["source=a", "output=b", "mesh.tensor=2"])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 2)


def test_partly_given_mapping_merges_with_its_default():
    from fusion_jax.config.schema import Config

    rules = load(Config, None, ["mesh.rules.embed=[tensor]"]).mesh.rules
    assert rules["embed"] == ("tensor",) and rules["batch"] == ("data", "fsdp")


def test_override_indexes_into_a_list_the_file_gives():
    from fusion_jax.config.loader import ConfigError, apply_overrides

    data = {"sources": [{"name": "a"}, {"name": "b"}]}
    out = apply_overrides(data, ["sources[1].align=fusellm", "sources[-2].name=c", "demo.code.steps=3"])
    assert out["sources"] == [{"name": "c"}, {"name": "b", "align": "fusellm"}]
    assert out["demo"] == {"code": {"steps": 3}} and data["sources"][1] == {"name": "b"}  # the input is not changed
    for bad, message in [("sources[2].x=1", "sources has 2 items"), ("sources[0]=1", "set a key of the list item"),
                         ("demo[0].x=1", "not a list"), ("sources.x=1", "not a section"),
                         ("sources[a].x=1", "not a key or key\\[index\\]")]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(data, [bad])


# --- ranges (option bounds), duplicate keys, list-item sections in --help ----------------------------------------

def _ranged_classes():
    from fusion_jax.config.loader import option

    @dataclasses.dataclass(frozen=True)
    class Item:
        name: str = option("its name")
        share: float = option("a share", 0.5, minimum=0, exclusive_maximum=1)

    @dataclasses.dataclass(frozen=True)
    class Ranged:
        steps: int = option("how many", 3, minimum=1)
        rate: float = option("how fast", 0.1, exclusive_minimum=0)
        limit: int | None = option("at most", None, maximum=255)
        weights: tuple[float, ...] = option("one per item", (), minimum=0)
        flag: bool = option("a bool is not a number here", False)
        items: tuple[Item, ...] = option("the items", ())
        extra: Item | None = option("an optional section", None)

    return Item, Ranged


@pytest.mark.parametrize("override, message", [
    ("steps=0", "steps: must be >= 1, got 0"),
    ("rate=0", "rate: must be > 0, got 0.0"),
    ("rate=.nan", "rate: must be > 0, got nan"),
    ("rate=.inf", "rate: must be > 0, got inf"),
    ("limit=256", "limit: must be <= 255, got 256"),
    ("weights=[1, 2, -0.5]", r"weights\[2\]: must be >= 0, got -0.5"),
    ("items=[{name: a, share: 1}]", r"items\[0\].share: must be in \[0, 1\), got 1.0"),
    ("extra={name: a, share: -1}", r"extra.share: must be in \[0, 1\), got -1.0"),
])
def test_bounds_name_the_key_and_the_range(override, message):
    _, Ranged = _ranged_classes()
    with pytest.raises(ConfigError, match=f"^{message} \\(in --set "):
        load(Ranged, None, [override])


def test_bounds_accept_their_edges_and_none():
    Item, Ranged = _ranged_classes()
    cfg = load(Ranged, None, ["steps=1", "rate=1e-9", "limit=255", "weights=[0, 3]", "flag=true",
                              "items=[{name: a, share: 0}]"])
    assert (cfg.steps, cfg.limit, cfg.weights, cfg.items) == (1, 255, (0.0, 3.0), (Item("a", 0.0),))
    assert load(Ranged, None, ["limit=null"]).limit is None


def test_describe_lists_ranges_and_the_fields_of_list_items_and_optional_sections():
    _, Ranged = _ranged_classes()
    lines = {line.split()[0]: line for line in describe(Ranged).splitlines()}
    assert list(lines) == ["steps", "rate", "limit", "weights", "flag", "items", "items[].name", "items[].share",
                           "extra", "extra.name", "extra.share"]
    assert "int (>= 1) = 3" in lines["steps"] and "float (> 0) = 0.1" in lines["rate"]
    assert "int | None (<= 255) = null" in lines["limit"] and "tuple[float, ...] (>= 0) = []" in lines["weights"]
    assert "str = (required)" in lines["items[].name"] and "float (in [0, 1)) = 0.5" in lines["items[].share"]
    assert "bool = false" in lines["flag"] and lines["steps"].endswith("how many")


def test_duplicate_keys_are_an_error(tmp_path):
    path = write(tmp_path, "steps: 1\nmodel:\n  hidden: 8\nsteps: 2\n")
    assert error(load, Run, path) == (f"{path}: key 'steps' is given twice (line 1 and line 4); YAML would silently "
                                      "keep only the second: merge the two into one")
    path = write(tmp_path, "model:\n  attn: {kind: dot, kind: flash}\n")
    assert "key 'model.attn.kind' is given twice (line 2, columns 10 and 21)" in error(load, Run, path)
    assert "--set model={hidden: 8, hidden: 16}: key 'model.hidden' is given twice" in error(
        load, Run, None, ["model={hidden: 8, hidden: 16}"])
