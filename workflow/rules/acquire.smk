# Stage acquire: download inputs whose source is "url" (resumable, verified, atomic).


wildcard_constraints:
    source="|".join(download_keys()),


rule acquire:
    output:
        str(Path(RESOURCES, "download", "{source}", "{filename}")),
    log:
        str(Path(RESOURCES, "logs", "acquire_{source}_{filename}.log")),
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=600,
    params:
        url=lambda wc: download_cfg(wc.source)["url"],
        verify=lambda wc: acquire_args(wc.source),
    shell:
        "python -m dgex acquire --url {params.url:q} --output {output:q} {params.verify} --no-progress > {log} 2>&1"


rule decompress_gctx:
    input:
        str(Path(RESOURCES, "download", "{source}", "{name}.gctx.gz")),
    output:
        str(Path(RESOURCES, "unpacked", "{source}", "{name}.gctx")),
    log:
        str(Path(RESOURCES, "logs", "decompress_{source}_{name}.log")),
    conda:
        "../../envs/dgex.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
    shell:
        "(gzip -dc {input:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}) > {log} 2>&1"
