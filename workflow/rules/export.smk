# Stage export: the grid's best network (chosen on validation) as a self-contained bundle for `dgex infer`.


rule export:
    input:
        dataset=out("data", "dataset.h5"),
        aggregate=out("aggregate", "aggregate.json"),
    output:
        # the bundle is a folder; bundle.json is written last and marks it complete
        bundle=out("model", "bundle.json"),
    log:
        out("logs", "export.log"),
    benchmark:
        out("benchmarks", "export.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        aggregate=lambda wc, input: os.path.dirname(input.aggregate),
        outdir=lambda wc, output: os.path.dirname(output.bundle),
        args=lambda wc: settings_args("export"),
    shell:
        "python -m dgex export --dataset {input.dataset:q} --grid-aggregate {params.aggregate:q} "
        "{params.args} --output {params.outdir:q} --overwrite --no-progress > {log} 2>&1"
