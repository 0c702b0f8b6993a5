# Tiny bases: the tokenizer and pretraining on the general mixture. The embedded default
# ships their outputs in data/; these rules reproduce them (`snakemake results/bases/xs`).


rule tokenizer:
    output:
        directory(f"{RESULTS}/tokenizer"),
    params:
        tokenizer=CFG["tokenizer"],
        domains=CFG["domains"],
    log:
        f"{RESULTS}/logs/tokenizer.log",
    conda:
        "../envs/mergelaws.yaml"
    shell:
        "mergelaws tokenizer --config {RESOLVED} --out {output} 2>&1 | tee {log}"


rule pretrain:
    input:
        rules.tokenizer.output,
    output:
        directory(f"{RESULTS}/bases/{{size}}"),
    params:
        spec=lambda wc: CFG["bases"][wc.size],
        pretrain=CFG["pretrain"],
    threads: threads_for("pretrain")
    resources:
        mem_mb=res("pretrain", "mem_mb", 4000),
        runtime=res("pretrain", "runtime", 60),
        gpu=res("pretrain", "gpu", 0),
    log:
        f"{RESULTS}/logs/pretrain/{{size}}.log",
    conda:
        "../envs/mergelaws.yaml"
    shell:
        "mergelaws pretrain --config {RESOLVED} --size {wildcards.size} --tokenizer {input} "
        "--out {output} --threads {threads} 2>&1 | tee {log}"
