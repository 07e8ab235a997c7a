"""The generated docs pages: docs/configuration.md follows the schema, docs/benchmarks.md its results."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from slidetrain.docs import benchmarks, configuration

REPO = Path(__file__).resolve().parents[1]


def test_configuration_page_is_what_the_generator_writes():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == configuration.render(), (
        "docs/configuration.md is stale: run `python -m slidetrain.docs.configuration > docs/configuration.md`"
    )


def test_every_schema_key_has_a_description():
    schema = yaml.safe_load(configuration.SCHEMA.read_text())
    assert configuration.undescribed(schema) == []


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_every_config_key_is_described_in_the_schema(name):
    schema = yaml.safe_load(configuration.SCHEMA.read_text())
    config = yaml.safe_load((REPO / "config" / name).read_text())
    assert configuration.config_keys_without_description(config, schema) == []


def test_a_key_without_description_is_caught():
    schema = yaml.safe_load(configuration.SCHEMA.read_text())
    del schema["properties"]["preprocess"]["properties"]["tile_px"]["description"]
    assert configuration.undescribed(schema) == ["preprocess.tile_px"]
    assert configuration.config_keys_without_description({"preprocess": {"tile_px": 1}}, schema) == [
        "preprocess.tile_px"
    ]
    assert configuration.config_keys_without_description({"preprocess": {"tile_size": 1}}, schema) == [
        "preprocess.tile_size (not in the schema)"
    ]
    with pytest.raises(ValueError, match="preprocess.tile_px"):
        configuration.render(schema=schema)


def test_configuration_page_lists_method_and_tilebag_keys():
    page = configuration.render()
    for text in (
        "`preprocess.tile_px`",
        "`datasets.<name>.sheet`",
        "`docs.build`",
        "`clam_sb`",
        "`local_k4`",
        "| `K` | `4` (fixed by the name)",
        "`executor`",
        "`checkpointing`",
    ):
        assert text in page, text


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_benchmarks_page_renders_each_table_with_its_stamp(tmp_path):
    _write(tmp_path / "results/tables/table1.csv", "method,accuracy,auroc\nabmil,0.93333,0.994\nmaxpool,0.9,0.98\n")
    _write(tmp_path / "results/bench/read_speed.csv", "slide,reader,mpx_per_s\ns1,openslide,37.5\ns1,tifffile,120.25\n")
    _write(tmp_path / "results/bench/unknown_probe.csv", "a,b\n1,2\n")
    os.utime(tmp_path / "results/tables/table1.csv", (1_800_000_000, 1_800_000_000))  # 2027-01-15 08:00 UTC
    stamp = benchmarks.Stamp(commit="0123abc", cpu="Test CPU 9000", threads=2, gpu="none")
    page = benchmarks.render(tmp_path, stamp)

    for title, path in (
        ("Table 1", "results/tables/table1.csv"),
        ("Slide reading", "results/bench/read_speed.csv"),
        ("results/bench/unknown_probe.csv", "results/bench/unknown_probe.csv"),
    ):
        section = page.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        assert f"Command: `snakemake --cores all {path}`" in section
        assert "commit `0123abc`" in section and "CPU: Test CPU 9000" in section
        assert "threads: 2" in section and "GPU: none" in section
    assert "written 2027-01-15 08:00 UTC" in page
    assert "| method | accuracy | auroc |" in page and "| abmil | 0.9333 | 0.994 |" in page
    assert "| s1 | tifffile | 120.2 |" in page
    # a known result that is missing is listed with the command that makes it
    missing = page.split("## Not built yet", 1)[1]
    assert "`snakemake --cores all tilebag`" in missing and "results/tables/table2.csv" in missing
    assert "results/tables/table1.csv" not in missing


def test_benchmarks_page_without_results_lists_every_command(tmp_path):
    page = benchmarks.render(tmp_path, benchmarks.Stamp("c", "cpu", 1, "none"))
    assert "No results exist yet" in page
    for r in benchmarks.CATALOGUE:
        assert f"`{r.command}`" in page


def test_docs_inputs_build_the_configured_results_and_add_existing_ones(tmp_path):
    _write(tmp_path / "results/tables/tilebag_table1.csv", "a\n1\n")
    assert benchmarks.docs_inputs(None, tmp_path) == [*benchmarks.DEFAULT_BUILD, "results/tables/tilebag_table1.csv"]
    assert benchmarks.docs_inputs(["results/tables/table1.csv"], tmp_path) == [
        "results/tables/table1.csv",
        "results/tables/tilebag_table1.csv",
    ]
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert tuple(config["docs"]["build"]) == benchmarks.DEFAULT_BUILD
    full = yaml.safe_load((REPO / "config" / "docs_full.yaml").read_text())
    assert full["docs"]["build"] == [r.path for r in benchmarks.CATALOGUE]


def test_every_catalogued_result_is_a_rule_output_and_the_heatmap_cost_is_catalogued():
    rules = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    for r in benchmarks.CATALOGUE:
        assert f'"{r.path}"' in rules, f"{r.path}: no rule of workflow/rules/ writes it"
    heatmaps = next(r for r in benchmarks.CATALOGUE if r.path == "results/bench/heatmaps.csv")
    assert heatmaps.command == "snakemake --cores all results/bench/heatmaps.csv"
    assert "rule bench_heatmaps" in (REPO / "workflow" / "rules" / "heatmaps.smk").read_text()


def test_machine_stamp_reads_this_checkout():
    stamp = benchmarks.machine_stamp(REPO)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if head:
        assert stamp.commit.split()[0] == head
    assert stamp.cpu and stamp.cpu != "unknown"
    assert stamp.threads >= 1


def test_docs_benchmarks_command_writes_the_page(tmp_path):
    from slidetrain.cli import main

    _write(tmp_path / "results/bench/preprocess.csv", "stage,median_s\nmask,0.054\n")
    out = tmp_path / "docs" / "benchmarks.md"
    assert main(["docs-benchmarks", "--root", str(tmp_path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "## Preprocessing seconds per slide" in page and "| mask | 0.054 |" in page


def test_encoder_page_lists_every_registered_encoder():
    from slidetrain.models.encoders import ENCODER_NAMES
    from slidetrain.models.foundation import FOUNDATION_SPECS

    page = (REPO / "docs" / "encoders.md").read_text()
    missing = [n for n in (*ENCODER_NAMES, *FOUNDATION_SPECS) if f"`{n}`" not in page]
    assert not missing, f"docs/encoders.md does not list {missing}"
    for s in FOUNDATION_SPECS.values():
        assert s.card_url in page or s.name == "vit_tiny_test", s.name
