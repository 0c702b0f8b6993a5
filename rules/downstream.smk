# Downstream scores of merged models through lm-evaluation-harness (App. K, Fig 10): per (size,
# method) every subset of the pool with k <= downstream.max_k, merged in memory and scored on
# downstream.tasks. Inert while downstream.tasks is empty (the default run is unchanged).
from mergelaws import downstream as mldownstream

_DS = CFG["downstream"]
DOWNSTREAM = (
    [
        f"{RESULTS}/downstream/{s}/{m}.parquet"
        for s in (_DS["sizes"] or SIZES)
        for m in _DS["methods"]
    ]
    if _DS["tasks"]
    else []
)
_DS_TABLES = list(DOWNSTREAM)
if DOWNSTREAM:  # Fig 10's analogue from every (size, method) table, with where each curve saturates
    DOWNSTREAM += [f"{RESULTS}/figures/fig10_downstream.png", f"{RESULTS}/downstream/saturation.csv"]


rule downstream:
    input:
        base=base_input,
        # the pool's experts of the size (local ones; a hub-id expert is no input)
        experts=lambda wc: [f for d in mldownstream.pool(CFG) for f in grid.expert_input(CFG, wc.size, d)],
    output:
        parquet=f"{RESULTS}/downstream/{{size}}/{{method}}.parquet",
        csv=f"{RESULTS}/downstream/{{size}}/{{method}}.csv",
    params:
        config=RESOLVED,
        method=lambda wc: CFG["methods"][wc.method],
        downstream=_DS,
        evaluation=CFG["eval"],
        system_prompt=CFG["system_prompt"],
        seed=CFG["seed"],
    threads: threads_for("downstream")
    resources:
        mem_mb=res("downstream", "mem_mb", 8000),
        runtime=res("downstream", "runtime", 120),
        gpu=res("downstream", "gpu", 0),
    log:
        f"{RESULTS}/logs/downstream/{{size}}/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/downstream/{{size}}/{{method}}.tsv"
    conda:
        TORCH_ENV
    shell:
        "mergelaws downstream --config {params.config} --size {wildcards.size} --method {wildcards.method} "
        "--out {output.parquet} --threads {threads} 2>&1 | tee {log}"


rule fig10:
    input:
        _DS_TABLES,
    output:
        png=f"{RESULTS}/figures/fig10_downstream.png",
        pdf=f"{RESULTS}/figures/fig10_downstream.pdf",
        saturation=f"{RESULTS}/downstream/saturation.csv",
    params:
        out=f"{RESULTS}/figures/fig10_downstream",
    log:
        f"{RESULTS}/logs/fig10.log",
    benchmark:
        f"{RESULTS}/benchmarks/fig10.tsv"
    conda:
        FIT_ENV
    shell:
        "mergelaws fig10 {input} --out {params.out} --saturation {output.saturation} 2>&1 | tee {log}"
