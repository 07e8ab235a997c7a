# Per-slide heatmaps (slidetrain.wsi.heatmaps): a run's per-tile attention over each test slide's thumbnail,
# with the tissue-mask outline and, on synthetic slides, the lesion-truth outline; one PNG + per-tile CSV per
# slide in results/{dataset}/heatmaps/{method}/, tracked through its index.csv (test slides are known only
# once the split exists). Drawn for the first split and seed, as the attention figure.
#   snakemake --cores all heatmaps            Table 1's attention methods on the default run + the gallery
#   snakemake --cores all tilebag_heatmaps    the tile-bag trainer's runs (largest K of the sweep)
#   snakemake --cores all results/bench/heatmaps.csv    seconds and peak RSS per slide


include: "heatmaps_common.smk"


rule heatmap:
    input:
        attention=f"results/{{dataset}}/runs/{{method}}/{HEATMAP_SPLIT}/{HEATMAP_SEED}/attention.h5",
        predictions=f"results/{{dataset}}/runs/{{method}}/{HEATMAP_SPLIT}/{HEATMAP_SEED}/predictions.csv",
        split=f"results/{{dataset}}/splits/{HEATMAP_SPLIT}.csv",
        # masks and tiles of every slide (the manifests name them); the slides and their truth files
        preprocess=lambda w: manifests(base_dataset(w.dataset), "preprocess"),
        slides=lambda w: slides_ready(base_dataset(w.dataset)),
    output:
        index="results/{dataset}/heatmaps/{method}/index.csv",
    params:
        args=heatmap_args,
        max_px=config.get("heatmaps", {}).get("max_px", 1024),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/heatmaps/{method}.log",
    benchmark:
        "benchmarks/{dataset}/heatmaps/{method}.tsv"
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "slidetrain heatmap --attention {input.attention} --predictions {input.predictions} --method {wildcards.method}"
        " --split {input.split} {params.args} --max-px {params.max_px} --out-dir $(dirname {output.index})"
        " --index {output.index} > {log} 2>&1"


rule heatmap_gallery:
    input:
        lambda w: expand("results/{dataset}/heatmaps/{method}/index.csv", dataset=w.dataset,
                         method=heatmap_methods(w.dataset)),
    output:
        report("results/{dataset}/heatmaps/gallery.html", caption="../report/heatmaps.rst", category="Heatmaps"),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/{dataset}/heatmaps/gallery.log",
    benchmark:
        "benchmarks/{dataset}/heatmaps/gallery.tsv"
    shell:
        "slidetrain heatmap-gallery --indexes {input} --title 'Heatmaps of {wildcards.dataset}"
        f" (test slides of {HEATMAP_SPLIT}, seed {HEATMAP_SEED})' --out {{output}} > {{log}} 2>&1"


rule heatmaps:
    input:
        expand("results/{dataset}/heatmaps/gallery.html", dataset=config["table1"]["datasets"]),


rule tilebag_heatmaps:
    input:
        expand("results/{dataset}/heatmaps/gallery.html", dataset=_tilebag_cfg("datasets", [])),


rule synthesize_heatmap_large_slide:
    # with its lesion truth (resources/bench/large.tiff of bench.smk has none)
    output:
        slide="resources/bench/heatmap_large.tiff",
        truth="resources/bench/heatmap_large.truth.npz",
    params:
        size=" ".join(map(str, config.get("bench", {}).get("large_slide_px", [40960, 30720]))),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/synthesize_heatmap_large.log",
    benchmark:
        "benchmarks/bench/synthesize_heatmap_large.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain synthesize --slide-id heatmap_large --label high_grade --seed 0 --size-px {params.size}"
        " --out {output.slide} --truth {output.truth} > {log} 2>&1"


rule bench_heatmaps:
    input:
        index="results/{}/heatmaps/{}/index.csv".format(*_BENCH_HEATMAP),
        large="resources/bench/heatmap_large.tiff",
    output:
        report("results/bench/heatmaps.csv", caption="../report/heatmaps_bench.rst", category="Benchmarks"),
    params:
        run="results/{}/runs/{}/{}/{}".format(*_BENCH_HEATMAP, HEATMAP_SPLIT, HEATMAP_SEED),
        split="results/{}/splits/{}.csv".format(_BENCH_HEATMAP[0], HEATMAP_SPLIT),
        method=_BENCH_HEATMAP[1],
        data=heatmap_data_args(_BENCH_HEATMAP[0]),
        tile_px=config["preprocess"]["tile_px"],
        magnification=config["preprocess"]["target_magnification"],
        max_px=config.get("heatmaps", {}).get("max_px", 1024),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/heatmaps.log",
    benchmark:
        "benchmarks/bench/heatmaps.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain bench-heatmaps --method {params.method} --attention {params.run}/attention.h5 --split {params.split}"
        " {params.data} --large-slide {input.large} --tile-px {params.tile_px}"
        " --target-magnification {params.magnification} --max-px {params.max_px}"
        " --work-dir results/bench/heatmaps_work --out {output} > {log} 2>&1"
