import pytest

from selfevolve.config import RecipeConfig, build, load_yaml, parse_overrides, resolve
from selfevolve.errors import UserError


class Demo(RecipeConfig):
    steps: int = 10
    lr: float = 1e-3
    difficulties: list[int] = [1, 2]


def test_overrides_are_typed():
    cfg = build(Demo, parse_overrides(["steps=3", "lr=2e-4", "resume=true", "difficulties=[3,4]", "model=/a/b"]))
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.difficulties, cfg.model) == (3, 2e-4, True, [3, 4], "/a/b")


def test_text_fields_stay_text():
    cfg = build(Demo, parse_overrides(["model=42", "run_dir=2024", "seed=3"]))
    assert (cfg.model, cfg.run_dir, cfg.seed) == ("42", "2024", 3)


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match="unknown key 'stesp'.*did you mean 'steps'"):
        build(Demo, {"stesp": 3})


@pytest.mark.parametrize("args,match", [
    (["steps=many"], "steps"), (["lr=[1]"], "lr"), (["device=tpu"], "device"), (["max_turns=0"], "max_turns"),
])
def test_wrong_types_are_one_line(args, match):
    with pytest.raises(UserError, match=match) as e:
        build(Demo, parse_overrides(args))
    assert "\n" not in str(e.value)


def test_not_key_value():
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["steps"])


def test_yaml_layer(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("# header\n# comment\nsteps: 5\nlr: 0.5\n")
    cfg = resolve(Demo, y, {"lr": 0.1})
    assert (cfg.steps, cfg.lr) == (5, 0.1)
    y.write_text("stpes: 5\n")
    with pytest.raises(UserError, match=r"unknown key 'stpes' in .*c.yaml"):
        resolve(Demo, y, {})
    with pytest.raises(UserError, match="not found"):
        resolve(Demo, tmp_path / "missing.yaml", {})


def test_recipe_yaml_files_hold_only_what_differs_from_the_class():
    """One home per default (issue 34): a YAML key that repeats its config class's default
    would silently override a later change to the class."""
    from selfevolve.cli import RECIPES
    from selfevolve.cli import _config_path as config_path
    from selfevolve.cli import _recipe as recipe

    for name in RECIPES:
        path = config_path(name)
        values = load_yaml(path) if path is not None and path.exists() else {}
        defaults = recipe(name)[1]().model_dump()
        assert not [k for k, v in values.items() if defaults.get(k) == v], (name, values)
        assert resolve(recipe(name)[1], path, {}).max_new_tokens == 64  # settled in RecipeConfig
