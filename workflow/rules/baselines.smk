# Stage baselines: LR, LR-L2 (ridge), LR-L1 (lasso) and KNN-GE, tuned on GEO-va / 1000G-va.


wildcard_constraints:
    method="lr|ridge|lasso|knn",


rule baseline:
    input:
        dataset=out("data", "dataset.h5"),
    output:
        run=out("runs", "baselines", "{method}", "run.json"),
        per_gene=out("runs", "baselines", "{method}", "per_gene.csv"),
        metrics=out("runs", "baselines", "{method}", "metrics.json"),
        # the chosen linear map of each selection (standardised landmarks -> standardised targets)
        coefficients=expand(
            out("runs", "baselines", "{{method}}", "coefficients_{selection}.npz"),
            selection=selections(),
        ),
    log:
        out("logs", "baseline_{method}.log"),
    benchmark:
        out("benchmarks", "baseline_{method}.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: config["baselines"]["threads"]
    resources:
        mem_mb=config["baselines"]["mem_mb"],
        runtime=config["baselines"]["runtime"],
    params:
        outdir=lambda wc, output: os.path.dirname(output.run),
    shell:
        "python -m dgex baseline {wildcards.method} --dataset {input.dataset:q} --output-dir {params.outdir:q} "
        "--n-jobs {threads} --no-progress > {log} 2>&1"
