"The YAML recipes in configs/ are the presets written out: loading one gives exactly the preset."
from pathlib import Path
import pytest
from dino_from_scratch.config import PRESETS, load_recipe, save_recipe, get_recipe, recipe_diff

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_matches_preset(name, tmp_path):
    path = CONFIGS / f"{name}.yaml"
    assert path.exists(), f"configs/{name}.yaml is missing: regenerate with config.save_recipe"
    diff = recipe_diff(PRESETS[name](), load_recipe(path))
    assert not diff, f"configs/{name}.yaml drifted from the preset: {diff} (regenerate it with config.save_recipe)"
    save_recipe(PRESETS[name](), tmp_path / "r.yaml")
    assert (tmp_path / "r.yaml").read_text() == path.read_text()


def test_yaml_path_is_a_recipe():
    assert get_recipe(str(CONFIGS / "tiny_v1.yaml")) == PRESETS["tiny_v1"]()


def test_no_stray_yaml():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(PRESETS)


def test_set_reads_exponent_numbers():
    "PyYAML (YAML 1.1) reads '1e-5' as a string: `--set model.layerscale=1e-5` (None before) must still give a float."
    from dino_from_scratch.config import override
    r = override(get_recipe("tiny_v2"), ["model.layerscale=1e-5", "optim.betas=[0.9, 1e-3]", "optim.epoch_length=1e3",
                                         "optim.lr=2.5e-4", "run.out=1e5"])
    assert type(r.model.layerscale) is float and r.model.layerscale == 1e-5
    assert r.optim.betas == (0.9, 1e-3) and type(r.optim.betas[1]) is float
    assert r.optim.epoch_length == 1000 and type(r.optim.epoch_length) is int   # int | None field: an int
    assert r.optim.lr == 2.5e-4
    assert r.run.out == "1e5"                                                    # str | None field: the string


def test_dino_train_set_layerscale(capsys):
    "The newcomer's command from the chapter 12 docstring: `dino-train --recipe tiny_v2 --set model.layerscale=1e-5`."
    import yaml
    from dino_from_scratch.cli import main
    main(["--recipe", "tiny_v2", "--set", "model.layerscale=1e-5", "optim.layerwise_decay=0.9", "--print-recipe"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["layerscale"] == 1e-5 and printed["optim"]["layerwise_decay"] == 0.9
