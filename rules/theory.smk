# Theorem 3.1's predicted merging curve (theory.enabled, off by default): per size, the quadratic
# model from the experts' task vectors on the sweep's eval tokens, scored against the losses table.

rule theory:
    input:
        base=base_input,
        experts=expert_inputs,
        losses=LOSSES[0],
    output:
        parquet=f"{RESULTS}/theory/{{size}}.parquet",
        json=f"{RESULTS}/theory/{{size}}.json",
        compare=f"{RESULTS}/theory/{{size}}_compare.csv",
    params:
        config=RESOLVED,
        evaluation=CFG["eval"],
        methods=CFG["methods"],
        theory=CFG["theory"],  # the sampled variant's fractions and seed: a change reruns the rule
    threads: threads_for("theory")
    resources:
        mem_mb=res("theory", "mem_mb", 8000),
        runtime=res("theory", "runtime", 60),
        gpu=res("theory", "gpu", 0),
    log:
        f"{RESULTS}/logs/theory/{{size}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/theory/{{size}}.tsv"
    conda:
        TORCH_ENV
    shell:
        "mergelaws predict --config {params.config} --size {wildcards.size} --out {output.parquet} "
        "--losses {input.losses} --threads {threads} 2>&1 | tee {log}"
