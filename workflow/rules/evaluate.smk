# Stage score-test-set: every D-GEX grid point and baseline scored on each prepared test set (config test_sets).


# Checked at start: every test-set table and figure compares with LR-L2.
if test_set_names() and "ridge" not in config["baselines"]["methods"]:
    raise ValueError(
        "invalid config: test_sets are compared with LR-L2 but baselines.methods has no ridge; "
        "add ridge to baselines.methods or drop test_sets"
    )


wildcard_constraints:
    test_set=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


rule score_test_set:
    input:
        test_set=out("test_sets", "{test_set}", "data.h5"),
        dataset=out("data", "dataset.h5"),
        # the best D-GEX of each selection is chosen on validation from the aggregate, as the tables do
        aggregate=out("aggregate", "aggregate.json"),
        dgex=dgex_runs(),
        baselines=baseline_runs(),
        coefficients=baseline_coefficients(),
    output:
        per_gene=out("test_sets", "{test_set}", "per_gene.csv"),
        score=out("test_sets", "{test_set}", "score.json"),
        table_csv=out("tables", "test_set_{test_set}.csv"),
        table_md=out("tables", "test_set_{test_set}.md"),
        png=out("figures", "test_set_{test_set}_scatter.png"),
        pdf=out("figures", "test_set_{test_set}_scatter.pdf"),
    log:
        out("logs", "score_test_set_{test_set}.log"),
    benchmark:
        out("benchmarks", "score_test_set_{test_set}.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        dgex=lambda wc, input: run_dirs(input.dgex),
        baselines=lambda wc, input: run_dirs(input.baselines),
        aggregate=lambda wc, input: os.path.dirname(input.aggregate),
        outdir=lambda wc, output: str(Path(output.score).parents[2]),  # results/<name>/
        args=lambda wc: settings_args("score-test-set"),
    shell:
        "python -m dgex score-test-set --test-set {input.test_set:q} --dataset {input.dataset:q} "
        "--aggregate {params.aggregate:q} --dgex-runs {params.dgex} --baseline-runs {params.baselines} "
        "--name {wildcards.test_set} --output-dir {params.outdir:q} {params.args} > {log} 2>&1"


rule collect_test_sets:
    input:
        [out("test_sets", name, "score.json") for name in test_set_names()],
    output:
        out("tables", "test_sets.json"),
    log:
        out("logs", "collect_test_sets.log"),
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m dgex collect-test-sets {input:q} --output {output:q} > {log} 2>&1"
