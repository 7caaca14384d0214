# Stages aggregate -> tables -> figures: every run's per-gene errors into the paper's tables and figures.


rule aggregate:
    input:
        # the dataset says which target parts each grid point needs; runs are checked against its content
        dataset=out("data", "dataset.h5"),
        dgex=dgex_runs(),
        baselines=baseline_runs(),
    output:
        per_gene=out("aggregate", "per_gene.csv.gz"),
        summary=out("aggregate", "summary.csv"),
        history=out("aggregate", "history.csv"),
        runs=out("aggregate", "runs.csv"),
        info=out("aggregate", "aggregate.json"),
    log:
        out("logs", "aggregate.log"),
    benchmark:
        out("benchmarks", "aggregate.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        dgex=lambda wc, input: run_dirs(input.dgex),
        baselines=lambda wc, input: run_dirs(input.baselines),
        outdir=lambda wc, output: os.path.dirname(output.info),
    shell:
        "python -m dgex aggregate --dataset {input.dataset:q} --dgex-runs {params.dgex} "
        "--baseline-runs {params.baselines} --output-dir {params.outdir:q} > {log} 2>&1"


rule tables:
    input:
        out("aggregate", "aggregate.json"),
    output:
        **table_outputs(),
    log:
        out("logs", "tables.log"),
    benchmark:
        out("benchmarks", "tables.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        aggregate=lambda wc, input: os.path.dirname(input[0]),
        outdir=lambda wc, output: os.path.dirname(output.info),
        args=lambda wc: settings_args("tables"),
    shell:
        "python -m dgex tables --aggregate {params.aggregate:q} --output-dir {params.outdir:q} {params.args} "
        "> {log} 2>&1"


rule figures:
    input:
        out("aggregate", "aggregate.json"),
    output:
        **figure_outputs(),
    log:
        out("logs", "figures.log"),
    benchmark:
        out("benchmarks", "figures.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        aggregate=lambda wc, input: os.path.dirname(input[0]),
        outdir=lambda wc, output: os.path.dirname(output.info),
    shell:
        "python -m dgex figures --aggregate {params.aggregate:q} --output-dir {params.outdir:q} > {log} 2>&1"
