"""Synthetic difficulty presets: classic draws what the generator drew before presets existed; the
others show atypia at near-normal colour, on smaller lesions, with stain shifts between sites."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage

from slidetrain.errors import ConfigError
from slidetrain.wsi import synthetic
from slidetrain.wsi.shard import synthesize_shard
from slidetrain.wsi.synthetic import (
    DIFFICULTY_PRESETS,
    SyntheticSpec,
    read_truth,
    render_canvas,
    resolve_difficulty,
    synthetic_spec,
)

REPO = Path(__file__).resolve().parents[1]

# sha256 of the 5x canvas (RGB uint8 bytes) and of the truth arrays, and the spec as the TIFF
# description and truth file carry it, drawn by main at 3e64fb2 (before difficulty presets) on an AMD
# EPYC. The TIFF bytes matched too; they are not asserted because the JPEG encoder's version shapes them.
CLASSIC_BEFORE = {
    ("syn_0007", "high_grade", (1.0, 1.0)): (
        "67adf777b9991a7b079493aabebd5b342200971e77a504766894bcf912de033c",
        "e21bedf727cbd8ba8d9d30c7b9d50b08979611bf3b461e3041df871d8177c813",
    ),
    ("syn_0012", "low_grade", (1.25, 0.8)): (
        "1e21f8c3cf90c6dccd4fe0b76e2aed56efda460b05551b12d3b77a46e66dfcc8",
        "6f27f1a5be67bfd8a2375273e6b8ef8891dd2286b8fc9ff6ee40458108f03670",
    ),
    ("syn_0003", "normal", (1.0, 1.0)): (
        "966a1cc11fc46d884278be43ea9f6b390e4f92b2d26ac9c8f48194ed2ff083ba",
        "247446bc6e5d6b80c92135406dd85084e119c71ac041a3c2ea9cecf9df9f308e",
    ),
}
SPEC_KEYS_BEFORE = {
    "slide_id", "label", "seed", "width_px", "height_px", "n_pieces", "tissue_fraction", "lesion_fraction",
    "n_lesions", "high_grade_share", "has_pen", "pen_color", "has_debris", "stain_h", "stain_e", "mpp",
    "jpeg_quality", "tile_px",
}  # fmt: skip


@pytest.mark.parametrize("key", list(CLASSIC_BEFORE))
def test_classic_draws_the_pixels_and_truth_it_drew_before_presets(key, tmp_path):
    slide_id, label, stain = key
    spec = synthetic_spec(slide_id, label, seed=0, size_range_px=(1600, 2000), stain_scale=stain)
    assert spec == synthetic_spec(slide_id, label, 0, (1600, 2000), stain, resolve_difficulty("classic", {}))
    assert set(spec.to_dict()) == SPEC_KEYS_BEFORE
    canvas_sha, truth_sha = CLASSIC_BEFORE[key]
    assert hashlib.sha256(render_canvas(spec).tobytes()).hexdigest() == canvas_sha
    synthetic.write_synthetic_slide(tmp_path / "s.tif", spec, truth_path=tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert hashlib.sha256(b"".join(z[k].tobytes() for k in sorted(z.files))).hexdigest() == truth_sha


def test_presets_draw_their_ranges_and_sites_shift_stain_by_site_not_by_label():
    hard = resolve_difficulty("hard")
    flat = resolve_difficulty("hard", {"site_stain_sd": 0.0})  # the same draws without the site factors
    ratios: dict[int, set[float]] = {}
    for k in range(80):
        spec = synthetic_spec(f"syn_{k:04d}", "high_grade", seed=0, difficulty=hard)
        lo, hi = hard.lesion_fraction
        assert lo <= spec.lesion_fraction <= hi and hard.n_lesions[0] <= spec.n_lesions <= hard.n_lesions[1]
        assert spec.look == hard.look() and 0 <= spec.site < hard.n_sites
        normal = synthetic_spec(f"syn_{k:04d}", "normal", seed=0, difficulty=hard)
        assert (normal.site, normal.stain_h, normal.stain_e) == (spec.site, spec.stain_h, spec.stain_e)
        plain = synthetic_spec(f"syn_{k:04d}", "high_grade", seed=0, difficulty=flat)
        ratios.setdefault(spec.site, set()).add(round(spec.stain_h / plain.stain_h, 9))
    assert sorted(ratios) == list(range(hard.n_sites)), "every site has slides"
    assert all(len(r) == 1 for r in ratios.values()), "one hematoxylin factor per site"
    assert len({next(iter(r)) for r in ratios.values()}) == hard.n_sites, "sites differ"


def test_a_preset_spec_round_trips_through_its_json():
    spec = synthetic_spec("syn_0001", "low_grade", seed=0, difficulty=resolve_difficulty("moderate"))
    assert {"site", "lesion_look"} <= set(spec.to_dict())
    assert SyntheticSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def _lesion_vs_normal(spec) -> dict[str, float]:
    """Colour and nuclei of lesion cores against normal tissue cores on the 5x canvas."""
    canvas = render_canvas(spec).astype(np.float32)  # (h, w, 3)
    layout = synthetic._layout(spec)
    h, w = canvas.shape[:2]
    grade = np.kron(layout.lesion_grade, np.ones((4, 4), np.uint8))[:h, :w]
    tissue = np.kron(layout.tissue, np.ones((4, 4), bool))[:h, :w]
    lesion = ndimage.binary_erosion(grade > 0, iterations=4)
    normal = ndimage.binary_erosion(tissue & (grade == 0), iterations=4)
    grey = canvas.mean(-1)
    nuclei = grey < 140
    return {
        "colour": float(np.abs(canvas[lesion].mean(0) - canvas[normal].mean(0)).max()),
        "darkest": float(np.percentile(grey[normal], 1) - np.percentile(grey[lesion], 1)),
        "nuclear_area": float(nuclei[lesion].mean() / nuclei[normal].mean()),
    }


def test_hard_lesions_show_atypia_at_near_normal_colour_and_classic_ones_do_not():
    """Hard: lesion nuclei no darker than normal ones and the mean colour close, yet more nuclear area
    (size, density); classic's lesions, the contrast, are far darker in both."""
    for label in ("low_grade", "high_grade"):
        classic = _lesion_vs_normal(synthetic_spec(f"t_{label}_0", label, seed=0, size_range_px=(2500, 3500)))
        hard_spec = synthetic_spec(f"t_{label}_0", label, 0, (2500, 3500), difficulty=resolve_difficulty("hard"))
        hard = _lesion_vs_normal(hard_spec)
        assert classic["colour"] > 40 and classic["darkest"] > 20, classic
        assert hard["colour"] < 25 and hard["darkest"] < 10, hard
        assert hard["nuclear_area"] > 1.4, hard


def test_synthesize_shard_redraws_a_slide_whose_difficulty_changed(tmp_path):
    slides, out = [("syn_a", "high_grade")], tmp_path / "slides"
    synthesize_shard("h", slides, out, seed=1, size_range_px=(1000, 1000))
    stamp = (out / "syn_a.tiff").stat().st_mtime_ns
    synthesize_shard("h", slides, out, seed=1, size_range_px=(1000, 1000), difficulty="classic")
    assert (out / "syn_a.tiff").stat().st_mtime_ns == stamp
    synthesize_shard("h", slides, out, seed=1, size_range_px=(1000, 1000), difficulty="hard")
    assert (out / "syn_a.tiff").stat().st_mtime_ns > stamp
    assert read_truth(out / "syn_a.truth.npz")["spec"]["lesion_look"] == json.loads(
        json.dumps(resolve_difficulty("hard").look().__dict__)
    )


def test_unknown_presets_keys_and_bad_values_are_errors_naming_them():
    assert resolve_difficulty("hard", {"lesion_fraction": [0.1, 0.2]}).lesion_fraction == (0.1, 0.2)
    assert resolve_difficulty("moderate", {"n_sites": 2}).n_sites == 2
    with pytest.raises(ConfigError, match=r"synthetic_difficulty = 'easy': expected one of"):
        resolve_difficulty("easy")
    with pytest.raises(ConfigError, match=r"unknown keys \['lesion_size'\]"):
        resolve_difficulty("hard", {"lesion_size": 3})
    for key, value in (
        ("lesion_fraction", [0.2, 0.1]),
        ("lesion_fraction", 0.1),
        ("low_nuclei", [0.02, 1.0, 1.5]),
        ("n_sites", 2.5),
        ("stroma_loss", [0.1, 0.95]),
    ):
        with pytest.raises(ConfigError, match=rf"synthetic_difficulty_overrides\.{key} = "):
            resolve_difficulty("classic", {key: value})


def test_the_config_schema_lists_the_presets_and_override_keys_with_their_bounds():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    block = schema["properties"]["datasets"]["additionalProperties"]["properties"]
    assert block["synthetic_difficulty"]["enum"] == list(DIFFICULTY_PRESETS)
    keys = block["synthetic_difficulty_overrides"]["properties"]
    assert list(keys) == list(synthetic._DIFFICULTY_KEYS)
    for key, (n_items, (lo, hi), _kind) in synthetic._DIFFICULTY_KEYS.items():
        node = keys[key]["items"] if n_items else keys[key]
        assert (node["minimum"], node["maximum"]) == (lo, hi), key
        assert keys[key].get("minItems", 0) == n_items, key


def _midpoint(easy, hard):
    """Key by key midpoint of two presets: counts rounded up, the harder preset's number of sites."""
    out = {}
    for f in dataclasses.fields(easy):
        a, b = getattr(easy, f.name), getattr(hard, f.name)
        if f.name == "n_sites":
            out[f.name] = b
        elif f.name == "n_lesions":
            out[f.name] = tuple(math.ceil((x + y) / 2) for x, y in zip(a, b, strict=True))
        elif isinstance(a, tuple):
            out[f.name] = tuple((x + y) / 2 for x, y in zip(a, b, strict=True))
        else:
            out[f.name] = (a + b) / 2
    return out


@pytest.mark.parametrize("name, easy, hard", [("mild", "classic", "moderate"), ("subtle", "moderate", "hard")])
def test_intermediate_presets_are_midpoints(name, easy, hard):
    want = _midpoint(DIFFICULTY_PRESETS[easy], DIFFICULTY_PRESETS[hard])
    got = dataclasses.asdict(DIFFICULTY_PRESETS[name])
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert np.allclose(got[key], value, rtol=0, atol=1e-12), (name, key, got[key], value)
