# Benchmarks are rules that write tables, never timed asserts in tests.


rule synthesize_large_slide:
    output:
        slide="resources/bench/large.tiff",
    params:
        size=lambda w: " ".join(map(str, [max(config.get("bench", {}).get("large_slide_px", [40960, 30720]))] * 2)),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/synthesize_large.log",
    benchmark:
        "benchmarks/bench/synthesize_large.tsv"
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "slidetrain synthesize --slide-id large --label high_grade --seed 0"
        " --size-range-px {params.size} --out {output.slide} > {log} 2>&1"


use rule preprocess_slide as preprocess_large_slide with:
    input:
        slide="resources/bench/large.tiff",
    output:
        mask="results/bench_large/masks/{slide}.mask.png",
        qc="results/bench_large/masks/{slide}.qc.jpg",
        tiles="results/bench_large/tiles/{slide}.h5",
        image="results/bench_large/images/{slide}.jpg",
        image_meta="results/bench_large/images/{slide}.json",
        timings="results/bench_large/timings/{slide}.json",
        status="results/bench_large/qc/status/{slide}.json",
    params:
        outputs=lambda w, output: json.dumps(
            {
                "mask_png": output.mask,
                "qc_path": output.qc,
                "tiles_h5": output.tiles,
                "image_path": output.image,
                "image_meta_json": output.image_meta,
                "timings_json": output.timings,
            }
        ),
        params=lambda w: json.dumps(
            {k: v for k, v in config["preprocess"].items() if k != "on_bad_slide"} | {"mpp_fallback": None}
        ),
        on_bad_slide="error",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench_large/preprocess/{slide}.log",
    benchmark:
        "benchmarks/bench_large/preprocess/{slide}.tsv"


rule bench_preprocess:
    input:
        timings=[expand("results/{dataset}/timings/{slide}.json", dataset=d, slide=slide_ids(d)) for d in SHEETS],
        features=[features_of(d) for d in SHEETS],
        large="results/bench_large/timings/large.json",
    output:
        "results/bench/preprocess.csv",
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/preprocess.log",
    benchmark:
        "benchmarks/bench/preprocess.tsv"
    shell:
        "slidetrain bench-preprocess --timings {input.timings} {input.large} --features {input.features}"
        " --out {output} > {log} 2>&1"
