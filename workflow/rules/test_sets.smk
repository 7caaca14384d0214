# Stage prepare_test_set: each test set (config test_sets:) brought to the dataset's genes and scale.


wildcard_constraints:
    test_set="|".join(re.escape(t["name"]) for t in test_sets()) or "(?!)",


rule prepare_test_set:
    input:
        unpack(test_set_inputs),
    output:
        out("test_sets", "{test_set}", "data.h5"),
    log:
        out("logs", "test_set_{test_set}.log"),
    benchmark:
        out("benchmarks", "test_set_{test_set}.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=lambda wc: config["preprocess"]["memory_mb"] + 2000,
        runtime=config["preprocess"]["runtime"],
    params:
        args=lambda wc: test_set_args(wc.test_set),
    shell:
        "python -m dgex prepare-test-set --dataset {input.dataset:q} --source {input.source:q} {params.args} "
        "--output {output:q} > {log} 2>&1"
