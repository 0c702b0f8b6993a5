# The fused sweep: one job per (size, method, shard) merges its subsets in memory and evaluates
# each on every domain; the losses of all sweeps are aggregated into one table. Shards
# (sweep.shards, bases.<size>.sweep.shards) deal the subsets round-robin into several jobs.


rule sweep:
    input:
        base=base_input,
        experts=expert_inputs,
    output:
        f"{RESULTS}/sweeps/{{size}}/{{method}}/{{shard}}.parquet",
    params:
        config=RESOLVED,
        method=lambda wc: CFG["methods"][wc.method],
        sweep=lambda wc: grid.sweep_settings(CFG, wc.size),
        evaluation=CFG["eval"],
        system_prompt=CFG["system_prompt"],
        experts=lambda wc: grid.own_experts(CFG, wc.size),
        seed=CFG["seed"],
    threads: threads_for("sweep")
    resources:
        mem_mb=res("sweep", "mem_mb", 8000),
        runtime=res("sweep", "runtime", 120),
        gpu=res("sweep", "gpu", 0),
    log:
        f"{RESULTS}/logs/sweep/{{size}}/{{method}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sweep/{{size}}/{{method}}/{{shard}}.tsv"
    conda:
        TORCH_ENV
    shell:
        "mergelaws sweep --config {params.config} --size {wildcards.size} --method {wildcards.method} "
        "--shard {wildcards.shard} --out {output} --threads {threads} 2>&1 | tee {log}"


rule aggregate:
    input:
        grid.sweep_files(CFG),
    output:
        parquet=LOSSES[0],
        csv=LOSSES[1],
    log:
        f"{RESULTS}/logs/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate.tsv"
    conda:
        TORCH_ENV
    shell:
        "mergelaws aggregate {input} --out {output.parquet} 2>&1 | tee {log}"
