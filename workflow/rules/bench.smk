# Benchmarks are rules that write tables, never timed asserts in tests.
from types import SimpleNamespace


rule synthesize_large_slide:
    output:
        slide="resources/bench/large.tiff",
    params:
        size=" ".join(map(str, config.get("bench", {}).get("large_slide_px", [40960, 30720]))),
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
        " --size-px {params.size} --out {output.slide} > {log} 2>&1"


rule preprocess_large_slide:
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
        args=lambda w: preprocess_args(w, dataset_block={"mpp_fallback": None}, on_bad_slide="error"),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench_large/preprocess/{slide}.log",
    benchmark:
        "benchmarks/bench_large/preprocess/{slide}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "slidetrain preprocess --slide {input.slide:q} --slide-id {wildcards.slide} {params.args}"
        " --mask {output.mask} --qc {output.qc} --tiles {output.tiles} --image {output.image}"
        " --image-meta {output.image_meta} --timings {output.timings} --status {output.status} > {log} 2>&1"


rule bench_preprocess:
    input:
        manifests=[manifests(d, "preprocess") + manifests(d, features_step()) for d in PREPROCESSED_MAIN],
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
        "slidetrain bench-preprocess --manifests {input.manifests} --timings {input.large}"
        " --out {output} > {log} 2>&1"


# Feature extraction tiles/s: one shard of the first Table 1 dataset end to end (read, decode, encode,
# write) against the encoder alone on the same tiles held in memory, same device and threads.
rule bench_features_throughput:
    input:
        preprocess="results/{0}/shards/preprocess/{1}.tsv".format(*bench_shard()),
        slides=lambda w: shard_slide_inputs(SimpleNamespace(dataset=bench_shard()[0], shard=bench_shard()[1])),
    output:
        "results/bench/features_throughput.csv",
    params:
        slides=lambda w: shard_slides_arg(SimpleNamespace(dataset=bench_shard()[0], shard=bench_shard()[1])),
        tiles_dir="results/{0}/tiles".format(bench_shard()[0]),
        encoder=config["features"]["encoder"],
        batch_size=config["features"]["batch_size"],
        device=config["features"]["device"],
        workers=" ".join(map(str, _bench_cfg("features_workers", [0, 1]))),
        mpp=lambda w: mpp_arg(SimpleNamespace(dataset=bench_shard()[0])),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/features_throughput.log",
    benchmark:
        "benchmarks/bench/features_throughput.tsv"
    threads: config["features"].get("threads", 1)
    resources:
        runtime=30,
        gpu=1 if config["features"]["device"].startswith("cuda") else 0,
    shell:
        "slidetrain bench-features --slides {params.slides} --tiles-dir {params.tiles_dir}"
        " --encoder {params.encoder} --batch-size {params.batch_size} --workers {params.workers}"
        " --device {params.device} --threads {threads} {params.mpp} --out {output} > {log} 2>&1"


rule bench_bags:
    output:
        bags=directory("resources/bench/mil_bags"),
        split="resources/bench/mil_bags_split.csv",
    params:
        n_bags=config.get("bench", {}).get("mil_bags", 1000),
        n_instances=config.get("bench", {}).get("mil_instances", 2000),
        dim=config.get("bench", {}).get("mil_dim", 512),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/mil_bags.log",
    benchmark:
        "benchmarks/bench/mil_bags.tsv"
    shell:
        "slidetrain bench-bags --out-dir {output.bags} --split {output.split} --n-bags {params.n_bags}"
        " --n-instances {params.n_instances} --dim {params.dim} > {log} 2>&1"


rule bench_mil_epoch:
    input:
        bags="resources/bench/mil_bags",
        split="resources/bench/mil_bags_split.csv",
    output:
        history="results/bench/mil/{method}/history.csv",
    params:
        method_params=lambda w: json.dumps({**config["methods"].get(w.method, {}), "epochs": 1}),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/mil/{method}.log",
    benchmark:
        "benchmarks/bench/mil/{method}.tsv"
    threads: config.get("training", {}).get("threads", 1)
    shell:
        "slidetrain train-mil --method {wildcards.method} --params '{params.method_params}'"
        " --split {input.split} --features {input.bags} --classes negative positive"
        " --out $(dirname {output.history}) --seed 0 --threads {threads} > {log} 2>&1"


rule bench_mil_throughput:
    input:
        runs=expand("results/bench/mil/{method}/history.csv", method=MIL_METHODS),
    output:
        "results/bench/mil_throughput.csv",
    params:
        runs=expand("results/bench/mil/{method}", method=MIL_METHODS),
        benchmarks=expand("benchmarks/bench/mil/{method}.tsv", method=MIL_METHODS),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/mil_throughput.log",
    benchmark:
        "benchmarks/bench/mil_throughput.tsv"
    shell:
        "slidetrain bench-mil --runs {params.runs} --benchmarks {params.benchmarks} --out {output} > {log} 2>&1"


# Table 2: peak memory of one training slide (+ optimiser step) per image size and method, one job each
# so that every measurement runs alone (CPU: a fresh process' peak RSS; CUDA: max_memory_allocated).


rule bench_train_memory:
    output:
        "results/bench/train_memory/{device}/{size}/{method}.json",
    wildcard_constraints:
        size=r"\d+x\d+",
        device=r"cpu|cuda(:\d+)?",
        method=r"[A-Za-z0-9_]+",  # no dot: {method}.{variant}.json is bench_train_memory_variant's
    params:
        method_params=lambda w: json.dumps(_bench_cfg("train_memory", {}).get("params", {}).get(w.method, {})),
        threads=_bench_cfg("threads", 2),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/train_memory/{device}/{size}/{method}.log",
    benchmark:
        "benchmarks/bench/train_memory/{device}/{size}/{method}.tsv"
    threads: _bench_cfg("threads", 2)
    resources:
        mem_mb=_bench_cfg("train_memory", {}).get("mem_mb", 21000),  # image_e2e at 8698x7496: 18.8 GiB peak RSS
        runtime=60,
        gpu=lambda w: 1 if w.device.startswith("cuda") else 0,
    shell:
        "slidetrain bench-train-memory --method {wildcards.method} --size {wildcards.size}"
        " --device {wildcards.device} --params '{params.method_params}' --threads {threads}"
        " --out {output} > {log} 2>&1"


# A named variant (bench.train_memory.variants: name -> params, e.g. activation checkpointing) of
# every Table 2 method, image_e2e included, measured the same way: each variant row is divided by
# image_e2e under the same variant, so the ratio compares like with like.
rule bench_train_memory_variant:
    output:
        "results/bench/train_memory/{device}/{size}/{method}.{variant}.json",
    wildcard_constraints:
        size=r"\d+x\d+",
        device=r"cpu|cuda(:\d+)?",
        method=r"image_e2e|local_k4|local_k8",
        variant=r"[A-Za-z0-9_]+",
    params:
        method_params=lambda w: json.dumps(_bench_cfg("train_memory", {}).get("variants", {})[w.variant]),
        threads=_bench_cfg("threads", 2),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/train_memory/{device}/{size}/{method}.{variant}.log",
    benchmark:
        "benchmarks/bench/train_memory/{device}/{size}/{method}.{variant}.tsv"
    threads: _bench_cfg("threads", 2)
    resources:
        mem_mb=_bench_cfg("train_memory", {}).get("mem_mb", 21000),
        runtime=60,
        gpu=lambda w: 1 if w.device.startswith("cuda") else 0,
    shell:
        "slidetrain bench-train-memory --method {wildcards.method} --size {wildcards.size}"
        " --device {wildcards.device} --params '{params.method_params}' --threads {threads}"
        " --variant {wildcards.variant} --out {output} > {log} 2>&1"


rule table2:
    input:
        expand(
            "results/bench/train_memory/{device}/{size}/{method}.json",
            device=_bench_cfg("device", "cpu"),
            size=_bench_cfg("train_memory", {}).get("sizes", []),
            method=["image_e2e", "local_k4", "local_k8"],
        ),
        expand(
            "results/bench/train_memory/{device}/{size}/{method}.{variant}.json",
            device=_bench_cfg("device", "cpu"),
            size=_bench_cfg("train_memory", {}).get("sizes", []),
            method=["image_e2e", "local_k4", "local_k8"],
            variant=list(_bench_cfg("train_memory", {}).get("variants", {})),
        ),
    output:
        csv="results/tables/table2.csv",
        md="results/tables/table2.md",
        html=report("results/tables/table2.html", caption="../report/table2.rst", category="Tables"),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/tables/table2.log",
    benchmark:
        "benchmarks/tables/table2.tsv"
    shell:
        "slidetrain table2 --measurements {input} --out {output.csv} --markdown {output.md}"
        " --out-html {output.html} > {log} 2>&1"


# Table 3: the same synthetic slides through the tile pipeline (tiling, features, gated ABMIL) and
# through local-learning whole-slide inference, timed side by side in one process.
rule synthesize_inference_slide:
    output:
        "resources/bench/inference/{size}.tiff",
    wildcard_constraints:
        size=r"\d+x\d+",
    params:
        size=lambda w: " ".join(map(str, _INFERENCE_SLIDES[w.size])),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/inference/synthesize_{size}.log",
    benchmark:
        "benchmarks/bench/inference/synthesize_{size}.tsv"
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "slidetrain synthesize --slide-id bench_{wildcards.size} --label high_grade --seed 1"
        " --size-px {params.size} --out {output} > {log} 2>&1"


rule table3:
    input:
        expand("resources/bench/inference/{size}.tiff", size=_INFERENCE_SLIDES),
    output:
        csv="results/tables/table3.csv",
        md="results/tables/table3.md",
        html=report("results/tables/table3.html", caption="../report/table3.rst", category="Tables"),
    params:
        device=_bench_cfg("device", "cpu"),
        threads=_bench_cfg("threads", 2),
        repeats=_bench_cfg("inference", {}).get("repeats", 1),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/tables/table3.log",
    benchmark:
        "benchmarks/tables/table3.tsv"
    threads: _bench_cfg("threads", 2)
    resources:
        runtime=60,
        gpu=1 if _bench_cfg("device", "cpu").startswith("cuda") else 0,
    shell:
        "slidetrain bench-inference --slides {input} --device {params.device} --threads {threads}"
        " --repeats {params.repeats} --out {output.csv} --markdown {output.md} --out-html {output.html}"
        " > {log} 2>&1"


# Reading the 5x tissue box of Table 3's slides through OpenSlide and through tifffile, side by side.
rule bench_read_speed:
    input:
        expand("resources/bench/inference/{size}.tiff", size=_INFERENCE_SLIDES),
    output:
        "results/bench/read_speed.csv",
    params:
        threads=_bench_cfg("threads", 2),
        repeats=max(3, _bench_cfg("inference", {}).get("repeats", 1)),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/read_speed.log",
    benchmark:
        "benchmarks/bench/read_speed.tsv"
    threads: _bench_cfg("threads", 2)
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "slidetrain bench-read --slides {input} --threads {params.threads} --repeats {params.repeats}"
        " --out {output} > {log} 2>&1"


# How hard each synthetic difficulty is: validation AUROC of difficulty_probe.methods on difficulty_probe.splits
# of each of its datasets (config/difficulty.yaml draws every preset as a dataset of its own). Its inputs
# are the runs' training histories only: no test part is scored for it.
rule difficulty_probe:
    input:
        lambda w: [f"{r['run_dir']}/history.csv" for r in difficulty_probe_runs()],
    output:
        "results/bench/difficulty.csv",
    params:
        runs=lambda w: json.dumps(difficulty_probe_runs()),
        overrides=lambda w: json.dumps(
            {d: config["datasets"][d].get("synthetic_difficulty_overrides") or {} for d in config["datasets"]}
        ),
        encoder=config["features"]["encoder"],
        weights=config["features"]["weights"],
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/difficulty.log",
    benchmark:
        "benchmarks/bench/difficulty.tsv"
    shell:
        "slidetrain bench-difficulty --runs '{params.runs}' --overrides '{params.overrides}'"
        " --encoder {params.encoder} --weights {params.weights:q} --out {output} > {log} 2>&1"


# Forward tiles/s and peak RSS of each encoder at random init on the CPU, one process per encoder (the
# ViT-g entries hold 4.5 GB of fp32 weights each, so they never share a process or overlap).
_ENCODERS_CPU = _bench_cfg("encoders_cpu", {})


rule bench_encoders_cpu:
    output:
        "results/bench/encoders_cpu.csv",
    params:
        # no list: the command's default, every registered ResNet and published foundation model
        models=" ".join(["--models", *_ENCODERS_CPU["models"]]) if _ENCODERS_CPU.get("models") else "",
        batch=_ENCODERS_CPU.get("batch", 4),
        repeats=_ENCODERS_CPU.get("repeats", 2),
    conda:
        "../../envs/slidetrain.yaml"
    log:
        "logs/bench/encoders_cpu.log",
    benchmark:
        "benchmarks/bench/encoders_cpu.tsv"
    threads: _ENCODERS_CPU.get("threads", 2)
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "slidetrain bench-encoders-cpu {params.models}"
        " --batch {params.batch} --repeats {params.repeats} --threads {threads} --out {output} > {log} 2>&1"
