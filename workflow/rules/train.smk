# Stage train: one D-GEX network per grid point (layers x units x dropout) and target part.


wildcard_constraints:
    layers=r"\d+",
    units=r"\d+",
    dropout=r"\d+(\.\d+)?",
    part=r"\d+|all",


rule train:
    input:
        dataset=out("data", "dataset.h5"),
    output:
        # run.json is written last: its presence marks a finished run. The
        # best_*.pt checkpoints are deliberately not declared, so that an
        # interrupted run keeps them (and last.ckpt) for --resume; a checkpoint
        # of another dataset or config is discarded (--restart-incompatible).
        run=out("runs", "dgex", "{layers}x{units}_d{dropout}", "part{part}", "run.json"),
        per_gene=out("runs", "dgex", "{layers}x{units}_d{dropout}", "part{part}", "per_gene.csv"),
        history=out("runs", "dgex", "{layers}x{units}_d{dropout}", "part{part}", "history.csv"),
    log:
        out("logs", "train", "{layers}x{units}_d{dropout}_part{part}.log"),
    benchmark:
        out("benchmarks", "train", "{layers}x{units}_d{dropout}_part{part}.tsv")
    conda:
        "../../envs/dgex.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=lambda wc: train_mem_mb(wc),
        runtime=lambda wc: train_runtime(wc),
        gpu=1 if config["train"]["gpu"] else 0,
    params:
        args=lambda wc: settings_args("train"),
        outdir=lambda wc, output: os.path.dirname(output.run),
    shell:
        "python -m dgex train --dataset {input.dataset:q} --output-dir {params.outdir:q} "
        "--layers {wildcards.layers} --units {wildcards.units} --dropout {wildcards.dropout} "
        "--part {wildcards.part} --threads {threads} {params.args} --resume --restart-incompatible --no-progress > {log} 2>&1"
