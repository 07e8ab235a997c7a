# docs/benchmarks.md from results/: `snakemake --cores all docs --forcerun docs_benchmarks` (the page is
# committed: without --forcerun, Snakemake takes an existing page as up to date even when the results it
# reads are missing, as on a fresh clone). Its inputs are the results named in
# the config's docs.build (built if missing) and every other result the page knows that already exists
# (slidetrain.docs.benchmarks.CATALOGUE), so a table built later makes the page stale and it is rewritten.
# docs/configuration.md is generated from the config schema's descriptions.

from slidetrain.docs.benchmarks import docs_inputs


rule docs_benchmarks:
    input:
        lambda w: docs_inputs(config.get("docs", {}).get("build")),
    output:
        "docs/benchmarks.md",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/docs/benchmarks.log",
    benchmark:
        "benchmarks/docs/benchmarks.tsv"
    shell:
        "slidetrain docs-benchmarks --root . --out {output} > {log} 2>&1"


rule docs_configuration:
    input:
        schema="workflow/schemas/config.schema.yaml",
        config="config/config.yaml",
    output:
        "docs/configuration.md",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/docs/configuration.log",
    benchmark:
        "benchmarks/docs/configuration.tsv"
    shell:
        "python -m slidetrain.docs.configuration > {output} 2> {log}"


rule docs:
    input:
        "docs/benchmarks.md",
        "docs/configuration.md",
