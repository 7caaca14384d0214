# Stage report: one self-contained HTML page (tables inline, figures embedded, computed captions) beside the results.


rule report:
    input:
        report_inputs(),
    output:
        out("report.html"),
    log:
        out("logs", "report.log"),
    benchmark:
        out("benchmarks", "report.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        results=lambda wc, output: os.path.dirname(output[0]),
        name=config["name"],
    shell:
        "python -m dgex report --results-dir {params.results:q} --output {output:q} --name {params.name:q} "
        "> {log} 2>&1"
