# One expert per (base size, domain), fine-tuned from the base (response-only loss).


rule train:
    input:
        base=base_input,
    output:
        config=f"{RESULTS}/experts/{{size}}/{{domain}}/config.json",
    params:
        config=RESOLVED,
        out=lambda wc, output: os.path.dirname(output.config),
        train=lambda wc: grid.train_settings(CFG, wc.size),
        system_prompt=CFG["system_prompt"],
        data=lambda wc: CFG["domains"][wc.domain],
        base=lambda wc: grid.base_dir(CFG, wc.size),
    threads: threads_for("train")
    resources:
        mem_mb=res("train", "mem_mb", 4000),
        runtime=res("train", "runtime", 60),
        gpu=res("train", "gpu", 0),
        nodes=res("train", "nodes", 1),
    log:
        f"{RESULTS}/logs/train/{{size}}/{{domain}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{size}}/{{domain}}.tsv"
    conda:
        TRAIN_ENV
    shell:
        "mergelaws train --config {params.config} --size {wildcards.size} --domain {wildcards.domain} "
        "--out {params.out} --threads {threads} 2>&1 | tee {log}"


# The multitask reference: one model per size on the union of all domains' train splits, with
# the experts' trainer and settings, evaluated on every domain like a merge (multitask.enabled).
rule multitask:
    input:
        base=base_input,
    output:
        model=f"{RESULTS}/multitask/{{size}}/model/config.json",
        losses=f"{RESULTS}/multitask/{{size}}/losses.parquet",
    params:
        config=RESOLVED,
        out=lambda wc, output: os.path.dirname(output.model),
        train=lambda wc: grid.train_settings(CFG, wc.size),
        multitask=CFG["multitask"],
        evaluation=CFG["eval"],
        system_prompt=CFG["system_prompt"],
        data=CFG["domains"],
        base=lambda wc: grid.base_dir(CFG, wc.size),
    threads: threads_for("multitask")
    resources:
        mem_mb=res("multitask", "mem_mb", 4000),
        runtime=res("multitask", "runtime", 60),
        gpu=res("multitask", "gpu", 0),
        nodes=res("multitask", "nodes", 1),
    log:
        f"{RESULTS}/logs/multitask/{{size}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/multitask/{{size}}.tsv"
    conda:
        TRAIN_ENV
    shell:
        "mergelaws multitask --config {params.config} --size {wildcards.size} --out {params.out} "
        "--table {output.losses} --threads {threads} 2>&1 | tee {log}"
