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
    conda:
        TRAIN_ENV
    shell:
        "mergelaws train --config {params.config} --size {wildcards.size} --domain {wildcards.domain} "
        "--out {params.out} --threads {threads} 2>&1 | tee {log}"
