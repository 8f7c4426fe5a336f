"""Recipe format: validation messages, JSON round trip, per-example scaling, shipped recipes."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitprune_fx.flops import reference_flops_reduction
from fitprune_fx.recipe import FORMAT, ModelInfo, Recipe, RecipeError, shipped_recipes

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=60, deadline=None)

LLAVA_7B = {
    "name": "llava-hf/llava-1.5-7b-hf",
    "num_layers": 32,
    "num_visual_tokens": 576,
    "hidden_size": 4096,
    "intermediate_size": 11008,
}


def valid_dict() -> dict:
    return {
        "format": FORMAT,
        "model": dict(LLAVA_7B),
        "scorer": "fitprune",
        "prune": {"2": 89, "3": 36},
        "budget": 0.6,
        "flops_reduction": 0.597,
        "fit": {"alpha": 0.43, "samples": 64, "seconds": 12.3},
    }


def _message(d: dict) -> str:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(d)
    return str(info.value)


# ------------------------------------------------------------------------------ strategies
@st.composite
def model_infos(draw):
    heads = draw(st.none() | st.sampled_from([1, 2, 4, 8, 32]))
    kv = None if heads is None else draw(st.sampled_from([k for k in (1, 2, 4, 8, 32) if k <= heads]))
    return ModelInfo(
        name=draw(st.text(min_size=1, max_size=20)),
        num_layers=draw(st.integers(1, 48)),
        num_visual_tokens=draw(st.integers(1, 3000)),
        hidden_size=draw(st.integers(1, 8192)),
        intermediate_size=draw(st.integers(1, 30000)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )


@st.composite
def recipes(draw, info=None):
    info = info or draw(model_infos())
    layers = draw(st.lists(st.integers(0, info.num_layers - 1), unique=True, max_size=info.num_layers))
    prune, left = {}, info.num_visual_tokens
    for layer in layers:
        prune[layer] = draw(st.integers(0, min(left, info.num_visual_tokens // 3 + 1)))
        left -= prune[layer]
    fraction = st.none() | st.floats(0.0, 1.0)
    fit = st.none() | st.fixed_dictionaries(
        {
            "alpha": st.floats(0.0, 1.0),
            "samples": st.integers(1, 10_000),
            "seconds": st.floats(0, 1e5),
        }
    )
    return Recipe(
        model=info,
        prune=prune,
        scorer=draw(st.sampled_from(["fitprune", "fastv", "random", "my_scorer"])),
        budget=draw(fraction),
        flops_reduction=draw(fraction),
        fit=draw(fit),
        scorer_options=draw(st.just({}) | st.fixed_dictionaries({"seed": st.integers(0, 2**31)})),
    )


# ------------------------------------------------------------------------------ validation
def test_valid_dict_loads():
    r = Recipe.from_dict(valid_dict())
    assert r.prune == {2: 89, 3: 36}
    assert r.model == ModelInfo(**LLAVA_7B)


def test_unknown_format_names_supported_versions():
    d = valid_dict()
    d["format"] = "fitprune-recipe/99"
    msg = _message(d)
    assert "fitprune-recipe/99" in msg and "supported" in msg and FORMAT in msg


def test_missing_format():
    d = valid_dict()
    del d["format"]
    msg = _message(d)
    assert '"format"' in msg and FORMAT in msg


def test_missing_prune():
    d = valid_dict()
    del d["prune"]
    msg = _message(d)
    assert 'no "prune"' in msg and "add" in msg


@pytest.mark.parametrize("key", list(LLAVA_7B))
def test_missing_model_field(key):
    d = valid_dict()
    del d["model"][key]
    msg = _message(d)
    assert repr(key) in msg and "missing" in msg


def test_layer_past_the_model_names_index_and_depth():
    d = valid_dict()
    d["prune"]["32"] = 1
    msg = _message(d)
    assert "layer 32" in msg and "num_layers is 32" in msg and "0..31" in msg


def test_negative_layer_index():
    d = valid_dict()
    d["prune"]["-1"] = 1
    msg = _message(d)
    assert "layer -1" in msg and "num_layers is 32" in msg


def test_negative_count():
    d = valid_dict()
    d["prune"]["5"] = -3
    msg = _message(d)
    assert "layer 5" in msg and "negative" in msg and "-3" in msg


def test_total_over_visual_tokens():
    d = valid_dict()
    d["prune"] = {"0": 300, "1": 277}
    msg = _message(d)
    assert "577" in msg and "576" in msg and "num_visual_tokens" in msg


@pytest.mark.parametrize("key", ["two", "2.5", "", " 2", "1e1"])
def test_non_integer_layer_key(key):
    d = valid_dict()
    d["prune"][key] = 1
    msg = _message(d)
    assert repr(key) in msg and "not an integer" in msg


@pytest.mark.parametrize("count", [3.5, "4", True, None])
def test_non_integer_count(count):
    d = valid_dict()
    d["prune"]["4"] = count
    msg = _message(d)
    assert "layer 4" in msg and "not an integer" in msg


def test_int_keys_in_python_constructor_only():
    with pytest.raises(RecipeError, match="not an integer"):
        Recipe(model=ModelInfo(**LLAVA_7B), prune={"2": 3})


def test_unknown_top_level_key():
    d = valid_dict()
    d["budjet"] = 0.6
    msg = _message(d)
    assert "budjet" in msg and "unknown" in msg


def test_budget_as_percent_is_rejected():
    d = valid_dict()
    d["budget"] = 60
    msg = _message(d)
    assert '"budget"' in msg and "fraction" in msg


def test_nonpositive_model_dimension():
    d = valid_dict()
    d["model"]["hidden_size"] = 0
    msg = _message(d)
    assert "hidden_size" in msg and "positive" in msg


def test_unknown_scorer_is_allowed():
    d = valid_dict()
    d["scorer"] = "my_own_scorer"
    assert Recipe.from_dict(d).scorer == "my_own_scorer"


def test_not_a_dict():
    with pytest.raises(RecipeError, match="JSON object"):
        Recipe.from_dict([1, 2])


# ------------------------------------------------------------------------------ models
def _llava_config(num_layers=3, hidden=64, intermediate=128, image=32, patch=8, strategy="default"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=image,
        patch_size=patch,
    )
    return LlavaConfig(text_config=text, vision_config=vision, vision_feature_select_strategy=strategy)


@pytest.mark.parametrize("strategy,extra", [("default", 0), ("full", 1)])
def test_model_info_from_config(strategy, extra):
    info = ModelInfo.from_config(_llava_config(image=48, patch=8, strategy=strategy), name="t")
    assert (info.num_layers, info.hidden_size, info.intermediate_size) == (3, 64, 128)
    assert info.num_visual_tokens == (48 // 8) ** 2 + extra
    assert (info.num_attention_heads, info.num_key_value_heads) == (4, 2)
    assert info.name == "t"
    assert ModelInfo.from_config(_llava_config()).name == "unnamed"


def test_model_info_matches_tiny_factory():
    from fitprune_fx.testbed.tiny import num_image_tokens, tiny_llava

    model = tiny_llava(num_layers=2, image_size=24, patch_size=8)
    info = ModelInfo.from_config(model.config)
    assert info.num_visual_tokens == num_image_tokens(model)
    assert info.num_layers == 2


def test_check_model_mismatch_shows_both_values_and_the_fix():
    recipe = Recipe.from_dict(valid_dict())
    with pytest.raises(RecipeError) as e:
        recipe.check_model(_llava_config(num_layers=3, hidden=64, intermediate=128))
    msg = str(e.value)
    assert "num_layers 32 vs 3" in msg
    assert "hidden_size 4096 vs 64" in msg
    assert "intermediate_size 11008 vs 128" in msg
    assert "rescaled_to" in msg and "fit" in msg


def test_check_model_accepts_matching_model_with_other_visual_count():
    info = ModelInfo("tiny", 3, 16, 64, 128)
    recipe = Recipe(model=info, prune={0: 4, 1: 2})
    recipe.check_model(_llava_config(image=32, patch=4))  # 64 visual tokens: scaled per example
    recipe.check_model(info)
    with pytest.raises(RecipeError, match="intermediate_size 128 vs 256"):
        recipe.check_model(_llava_config(intermediate=256))


# ------------------------------------------------------------------------------ JSON
@FAST
@given(recipes())
def test_json_round_trip(recipe):
    text = recipe.to_json()
    back = Recipe.from_json(text)
    assert back == recipe
    assert back.to_json() == text  # stable formatting
    assert list(json.loads(text)["prune"]) == [str(k) for k in sorted(recipe.prune)]


def test_to_json_writes_file_and_loads_by_path(tmp_path):
    recipe = Recipe.from_dict(valid_dict())
    path = tmp_path / "r.json"
    text = recipe.to_json(path)
    assert path.read_text() == text
    assert Recipe.from_json(path) == recipe
    assert Recipe.from_json(str(path)) == recipe
    assert Recipe.load(os.fspath(path)) == recipe


def test_to_json_layout_follows_design():
    d = json.loads(Recipe.from_dict(valid_dict()).to_json())
    assert list(d) == ["format", "model", "scorer", "prune", "budget", "flops_reduction", "fit"]
    assert list(d["prune"]) == ["2", "3"]


@pytest.mark.parametrize("name", ["llava-1.5-7b/60.json", "recipes/llava-1.5-7b/60.json"])
def test_shipped_recipe_by_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = Recipe.from_json(name)
    assert recipe.model.num_layers == 32 and recipe.budget == 0.6
    assert Recipe.load(Path(name)) == recipe


def test_missing_file_lists_shipped_recipes(tmp_path):
    with pytest.raises(RecipeError) as e:
        Recipe.from_json(tmp_path / "nope.json")
    msg = str(e.value)
    assert "not found" in msg and "nope.json" in msg and "llava-1.5-7b/60.json" in msg


def test_invalid_json_text():
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.from_json('{"format": ')


def test_load_normalises_every_form():
    recipe = Recipe.from_dict(valid_dict())
    assert Recipe.load(recipe) is recipe
    assert Recipe.load(valid_dict()) == recipe
    assert Recipe.load(recipe.to_json()) == recipe
    with pytest.raises(RecipeError, match="cannot make a recipe from int"):
        Recipe.load(42)


# ------------------------------------------------------------------------------ counts
@FAST
@given(recipes(), st.data())
def test_deletions_for_properties(recipe, data):
    native = recipe.model.num_visual_tokens
    assert recipe.deletions_for(native) == {k: v for k, v in recipe.prune.items() if v}
    n1 = data.draw(st.integers(0, 3 * native))
    n2 = data.draw(st.integers(n1, 3 * native))
    d1, d2 = recipe.deletions_for(n1), recipe.deletions_for(n2)
    assert sum(d1.values()) <= n1 and sum(d2.values()) <= n2
    assert all(v > 0 for v in d1.values())
    cum1 = cum2 = cum = 0
    for layer in range(recipe.model.num_layers):
        cum1 += d1.get(layer, 0)
        cum2 += d2.get(layer, 0)
        cum += recipe.prune.get(layer, 0)
        assert cum1 <= cum2  # monotone in num_visual, layer by layer
        assert abs(cum1 - cum * n1 / native) <= 0.5  # proportional, rounding error <= 1/2


def test_deletions_for_rejects_negative():
    with pytest.raises(RecipeError, match="num_visual"):
        Recipe.from_dict(valid_dict()).deletions_for(-1)


@FAST
@given(recipes(), st.integers(0, 2000))
def test_tokens_per_layer(recipe, n):
    tokens = recipe.tokens_per_layer(n)
    assert len(tokens) == recipe.model.num_layers + 1
    assert tokens[0] == n and tokens[-1] == n - sum(recipe.deletions_for(n).values())
    assert all(a >= b for a, b in zip(tokens[:-1], tokens[1:], strict=True))
    assert recipe.tokens_per_layer()[0] == recipe.model.num_visual_tokens


@FAST
@given(recipes(), model_infos())
def test_rescaled_to_properties(recipe, info):
    out = recipe.rescaled_to(info)
    assert out.model == info
    assert all(0 <= layer < info.num_layers for layer in out.prune)
    assert sum(out.prune.values()) <= info.num_visual_tokens
    expected = reference_flops_reduction(
        out.prune, info.num_layers, info.num_visual_tokens, info.hidden_size, info.intermediate_size
    )
    assert out.flops_reduction == round(expected, 4)
    same = recipe.rescaled_to(recipe.model)
    assert same.prune == {k: v for k, v in recipe.prune.items() if v}


def test_rescaled_to_half_depth_merges_layers():
    recipe = Recipe(model=ModelInfo("a", 32, 576, 64, 128), prune={2: 10, 3: 6, 31: 4})
    out = recipe.rescaled_to(ModelInfo("b", 16, 576, 64, 128))
    assert out.prune == {1: 16, 15: 4}
    quarter = recipe.rescaled_to(ModelInfo("c", 16, 144, 64, 128))
    assert quarter.prune == {1: 4, 15: 1}


# ------------------------------------------------------------------------------ reports
def test_flops_report_and_describe():
    recipe = Recipe.from_dict(valid_dict())
    report = recipe.flops_report(num_text_tokens=40)
    assert abs(report.reference_reduction - recipe.reference_reduction()) < 1e-12
    assert report.full_reduction < report.reference_reduction
    assert report.rows[3].tokens_in == 576 - 89 and report.rows[3].tokens_out == 576 - 89 - 36
    half = recipe.flops_report(num_visual=288)
    assert half.rows[-1].tokens_out == 288 - sum(recipe.deletions_for(288).values())
    text = recipe.describe()
    lines = text.splitlines()
    assert f"{100 * recipe.reference_reduction():.2f}%" in lines[1]
    rows = [line.split() for line in lines[3:-1]]
    assert [int(r[0]) for r in rows] == list(range(32))
    assert [int(r[1]) for r in rows][2:4] == [89, 36]
    assert int(rows[-1][2]) == 576 - 125
    share = sum(float(r[3]) for r in rows)
    assert abs(share - 100 * (1 - recipe.reference_reduction())) < 0.01 * 32


# ------------------------------------------------------------------------------ shipped
def _load_script():
    path = REPO / "benchmarks" / "make_shipped_recipes.py"
    spec = importlib.util.spec_from_file_location("make_shipped_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _load_script()
PUBLISHED_PATH = Path(os.environ.get("FITPRUNE_PUBLISHED_RECIPES", SCRIPT.DEFAULT_PUBLISHED))
needs_published = pytest.mark.skipif(
    not PUBLISHED_PATH.is_file(), reason=f"published recipes not at {PUBLISHED_PATH}"
)


@pytest.fixture(scope="module")
def published() -> dict:
    return json.loads(PUBLISHED_PATH.read_text())


def _published_reduction(published: dict, label: str) -> float:
    m = published["model"]
    prune = {int(k): v for k, v in published["recipes"][label].items()}
    return reference_flops_reduction(
        prune, m["num_layers"], m["num_visual_tokens"], m["hidden_size"], m["intermediate_size"]
    )


@needs_published
def test_shipped_set_is_every_nonempty_published_label(published):
    labels = sorted((k for k, v in published["recipes"].items() if v), key=float)
    assert shipped_recipes() == [f"llava-1.5-7b/{k}.json" for k in labels]


@needs_published
def test_shipped_recipes_match_published_counts(published):
    for label, counts in published["recipes"].items():
        if not counts:
            continue
        recipe = Recipe.from_json(f"llava-1.5-7b/{label}.json")
        recipe.validate()
        assert recipe.prune == {int(k): v for k, v in counts.items()}
        assert recipe.budget == int(label) / 100
        assert recipe.flops_reduction == round(_published_reduction(published, label), 4)
        assert "alpha" not in (recipe.fit or {})


# DESIGN.md says the 30-90% recipes land within 0.5 points of their labels. With the reference
# model (the only reading that gives "60" -> 59.7%), 30 and 40 fall short (27.90%, 38.85%):
# recorded as strict xfails so a change of formula or data shows up.
SHORT_OF_LABEL = {"30", "40"}


@needs_published
@pytest.mark.parametrize(
    "label",
    [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, reason="published recipe undershoots"))
        if k in SHORT_OF_LABEL
        else k
        for k in ("30", "40", "50", "55", "60", "70", "80", "90")
    ],
)
def test_published_labels_rederive_within_half_a_point(published, label):
    assert abs(100 * _published_reduction(published, label) - float(label)) <= 0.5


@needs_published
def test_no_published_recipe_overshoots_and_design_quote_holds(published):
    for label, counts in published["recipes"].items():
        if counts:
            assert 100 * _published_reduction(published, label) <= float(label) + 0.5
    assert round(100 * _published_reduction(published, "60"), 1) == 59.7


@needs_published
def test_shipped_files_equal_regenerated(tmp_path):
    assert SCRIPT.main(["--published", str(PUBLISHED_PATH), "--out", str(tmp_path)]) == 0
    shipped_dir = REPO / "recipes" / "llava-1.5-7b"
    generated = sorted(p.name for p in tmp_path.glob("*.json"))
    assert generated == sorted(p.name for p in shipped_dir.glob("*.json"))
    for name in generated:
        assert (tmp_path / name).read_bytes() == (shipped_dir / name).read_bytes(), name


def test_published_dict_is_not_mutated_by_build():
    data = {
        "model": dict(LLAVA_7B, system_tokens_before_image=35),
        "recipes": {"0": {}, "5": {"1": 2}},
    }
    before = copy.deepcopy(data)
    built = SCRIPT.build_recipes(data)
    assert data == before and list(built) == ["5"]
    assert built["5"].budget == 0.05 and built["5"].prune == {1: 2}


def test_recipe_is_a_frozen_value():
    """Validated once, never changed after: fields and maps are read-only, copies via replace."""
    import dataclasses

    source = valid_dict()
    source["prune"] = {"2": 3}
    recipe = Recipe.load(source)
    source["prune"]["2"] = 99  # the caller's dict is not the recipe's
    assert recipe.prune == {2: 3}
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.scorer = "fastv"
    with pytest.raises(TypeError):
        recipe.prune[2] = 99
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.model.num_layers = 1
    assert Recipe.load(recipe) is recipe
    with pytest.raises(RecipeError, match="sum to at most"):
        dataclasses.replace(recipe, prune={2: 10_000})  # a copy is validated like a new recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
