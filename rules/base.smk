# Tiny bases: the tokenizer and pretraining on the general mixture. The embedded default
# ships their outputs in data/; these rules reproduce them (`snakemake results/bases/xs/config.json`).


rule tokenizer:
    output:
        directory(f"{RESULTS}/tokenizer"),
    params:
        config=RESOLVED,
        tokenizer=CFG["tokenizer"],
        domains=CFG["domains"],
    log:
        f"{RESULTS}/logs/tokenizer.log",
    conda:
        TORCH_ENV
    shell:
        "mergelaws tokenizer --config {params.config} --out {output} 2>&1 | tee {log}"


rule pretrain:
    input:
        rules.tokenizer.output,
    output:
        config=f"{RESULTS}/bases/{{size}}/config.json",
    params:
        config=RESOLVED,
        out=lambda wc, output: os.path.dirname(output.config),
        spec=lambda wc: CFG["bases"][wc.size],
        pretrain=lambda wc: {**CFG["pretrain"], **CFG["bases"][wc.size].get("pretrain", {})},
    threads: threads_for("pretrain")
    resources:
        mem_mb=res("pretrain", "mem_mb", 4000),
        runtime=res("pretrain", "runtime", 60),
        gpu=res("pretrain", "gpu", 0),
    log:
        f"{RESULTS}/logs/pretrain/{{size}}.log",
    conda:
        TORCH_ENV
    shell:
        "mergelaws pretrain --config {params.config} --size {wildcards.size} --tokenizer {input} "
        "--out {params.out} --threads {threads} 2>&1 | tee {log}"
