# Stage demo: the embedded synthetic inputs (used by inputs whose source is "demo").


rule demo_data:
    output:
        geo=out("demo", "geo.gctx"),
        g1000=out("demo", "1000g.tsv.gz"),
        gtex=out("demo", "gtex.gctx"),
        meta=out("demo", "demo.json"),
    log:
        out("logs", "demo_data.log"),
    benchmark:
        out("benchmarks", "demo_data.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        args=lambda wc: settings_args("demo-data"),
        outdir=lambda wc, output: os.path.dirname(output.geo),
    shell:
        "python -m dgex demo-data --output-dir {params.outdir} {params.args} > {log} 2>&1"
