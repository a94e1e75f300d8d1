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
