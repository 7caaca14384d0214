# Stage preprocess: raw inputs -> one processed dataset (splits, target parts, statistics).


rule preprocess:
    input:
        unpack(preprocess_inputs),
    output:
        dataset=out("data", "dataset.h5"),
        summary=out("data", "dataset.json"),
    log:
        out("logs", "preprocess.log"),
    benchmark:
        out("benchmarks", "preprocess.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=lambda wc: config["preprocess"]["memory_mb"] + 2000,
        runtime=config["preprocess"]["runtime"],
    params:
        args=lambda wc: preprocess_args(),
    shell:
        "python -m dgex preprocess --geo {input.geo:q} {params.args} --output {output.dataset:q} "
        "--summary {output.summary:q} --no-progress > {log} 2>&1"
