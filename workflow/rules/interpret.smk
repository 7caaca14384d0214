# Stage interpret: the paper's supplementary analyses of trained networks.
#   S2: adjusted R² of every target from the landmarks vs from each hidden layer
#   S3: the major weights (> k sigma) of a 1-hidden-layer network


rule interpret_s2:
    input:
        dataset=out("data", "dataset.h5"),
        runs=lambda wc: network_runs(s2_network()),
    output:
        info=out("interpret", "s2", "s2.json"),
        summary=out("interpret", "s2", "s2_summary.csv"),
        table=out("interpret", "s2", "s2_adjusted_r2.csv"),
        png=out("interpret", "s2", "figure_s2.png"),
        pdf=out("interpret", "s2", "figure_s2.pdf"),
    log:
        out("logs", "interpret_s2.log"),
    benchmark:
        out("benchmarks", "interpret_s2.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=lambda wc: s2_mem_mb(),
        runtime=60,
    params:
        runs=lambda wc, input: run_dirs(input.runs),
        outdir=lambda wc, output: os.path.dirname(output.info),
        args=lambda wc: settings_args("interpret s2"),
    shell:
        "python -m dgex interpret s2 --dataset {input.dataset:q} --runs {params.runs} {params.args} "
        "--output-dir {params.outdir:q} --no-progress > {log} 2>&1"


rule interpret_s3:
    input:
        dataset=out("data", "dataset.h5"),
        runs=lambda wc: network_runs(s3_network()),
    output:
        info=out("interpret", "s3", "s3.json"),
        png=out("interpret", "s3", "figure_s3.png"),
        pdf=out("interpret", "s3", "figure_s3.pdf"),
    log:
        out("logs", "interpret_s3.log"),
    benchmark:
        out("benchmarks", "interpret_s3.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        runs=lambda wc, input: run_dirs(input.runs),
        outdir=lambda wc, output: os.path.dirname(output.info),
        args=lambda wc: settings_args("interpret s3"),
    shell:
        "python -m dgex interpret s3 --dataset {input.dataset:q} --runs {params.runs} {params.args} "
        "--output-dir {params.outdir:q} --no-progress > {log} 2>&1"
