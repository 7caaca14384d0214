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
        args=lambda wc: " ".join(
            [
                f"--seed {config['demo']['seed']}",
                f"--n-geo {config['demo']['n_geo']}",
                f"--n-duplicates {config['demo']['n_duplicates']}",
                f"--n-1000g {config['demo']['n_1000g']}",
                f"--n-gtex {config['demo']['n_gtex']}",
                f"--n-latent {config['demo']['n_latent']}",
                f"--noise {config['demo']['noise']}",
                f"--target-seed {config['genes']['target_seed']}",
            ]
            + ([f"--max-targets {config['genes']['max_targets']}"] if config["genes"].get("max_targets") else [])
            + (["--targets u133a-probes"] if config["genes"]["targets"] == "u133a-probes" else [])
        ),
        outdir=lambda wc, output: os.path.dirname(output.geo),
    shell:
        "python -m dgex demo-data --output-dir {params.outdir} {params.args} > {log} 2>&1"
