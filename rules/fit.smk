# Fit the laws to the losses table and draw the figures.


rule fit:
    input:
        LOSSES[0],
    output:
        FITS,
        # the unified law with bootstrap intervals and held-out-size check; variance laws
        multiext(f"{RESULTS}/fits/unified", ".parquet", ".csv"),
        multiext(f"{RESULTS}/fits/variance", ".parquet", ".csv"),
    params:
        config=RESOLVED,
        fit=CFG["fit"],
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/fit.log",
    benchmark:
        f"{RESULTS}/benchmarks/fit.tsv"
    conda:
        FIT_ENV
    shell:
        "mergelaws fit {input} --config {params.config} --out {params.out} 2>&1 | tee {log}"


rule figures:
    input:
        losses=LOSSES[0],
        fits=FITS[0],
        compute=COMPUTE,
        multitask=MULTITASK,
        experts=TRAINED_EXPERTS,
    output:
        figure_outputs(),
    params:
        config=RESOLVED,
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/figures.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures.tsv"
    conda:
        FIT_ENV
    shell:
        "mergelaws figures --config {params.config} --losses {input.losses} --fits {input.fits} "
        "--compute {input.compute} --multitask {input.multitask} --experts {input.experts} "
        "--out {params.out} 2>&1 | tee {log}"


rule compute:
    input:
        BENCHMARKS,
    output:
        COMPUTE,
    log:
        f"{RESULTS}/logs/compute.log",
    benchmark:
        f"{BENCH}/compute.tsv"
    conda:
        FIT_ENV
    shell:
        "mergelaws compute {input} --out {output} 2>&1 | tee {log}"


rule plan:
    input:
        losses=LOSSES[0],
        fits=FITS[0],
        compute=COMPUTE,
        multitask=MULTITASK,
        theory=THEORY_COMPARE,
    output:
        report(PLAN[0], caption="../report/plan.rst", category="Plan"),
        PLAN[1],
    params:
        config=RESOLVED,
        fit=CFG["fit"],
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/plan.log",
    benchmark:
        f"{RESULTS}/benchmarks/plan.tsv"
    conda:
        FIT_ENV
    shell:
        "mergelaws plan {input.losses} --fits {input.fits} --config {params.config} "
        "--compute {input.compute} --multitask {input.multitask} --theory {input.theory} "
        "--out {params.out} 2>&1 | tee {log}"
