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


wildcard_constraints:
    linear="lr|lr-l2|lr-l1|knn-ge",


rule export_linear:
    input:
        dataset=out("data", "dataset.h5"),
        run=lambda wc: out("runs", "baselines", linear_method(wc.linear), "run.json"),
        coefficients=lambda wc: out(
            "runs",
            "baselines",
            linear_method(wc.linear),
            f"coefficients_{config['export']['selection']}.npz",
        ),
    output:
        bundle=out("model_{linear}", "bundle.json"),
    log:
        out("logs", "export_{linear}.log"),
    benchmark:
        out("benchmarks", "export_{linear}.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        run=lambda wc, input: os.path.dirname(input.run),
        outdir=lambda wc, output: os.path.dirname(output.bundle),
        args=lambda wc: settings_args("export"),
    shell:
        "python -m dgex export --dataset {input.dataset:q} --baseline-run {params.run:q} "
        "{params.args} --output {params.outdir:q} --overwrite --no-progress > {log} 2>&1"


rule prefer_model:
    input:
        bundles=exported_bundles(),
    output:
        out("preferred_model.json"),
    log:
        out("logs", "prefer_model.log"),
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    params:
        bundles=lambda wc, input: shell_args(os.path.dirname(b) for b in input.bundles),
    shell:
        "python -m dgex prefer-model --bundles {params.bundles} --output {output:q} > {log} 2>&1"
