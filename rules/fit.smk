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
    conda:
        FIT_ENV
    shell:
        "mergelaws fit {input} --config {params.config} --out {params.out} 2>&1 | tee {log}"


rule figures:
    input:
        losses=LOSSES[0],
        fits=FITS[0],
    output:
        figure_outputs(),
    params:
        config=RESOLVED,
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/figures.log",
    conda:
        FIT_ENV
    shell:
        "mergelaws figures --config {params.config} --losses {input.losses} --fits {input.fits} "
        "--out {params.out} 2>&1 | tee {log}"


rule plan:
    input:
        losses=LOSSES[0],
        fits=FITS[0],
    output:
        report(PLAN[0], caption="../report/plan.rst", category="Plan"),
        PLAN[1],
    params:
        config=RESOLVED,
        fit=CFG["fit"],
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/plan.log",
    conda:
        FIT_ENV
    shell:
        "mergelaws plan {input.losses} --fits {input.fits} --config {params.config} "
        "--out {params.out} 2>&1 | tee {log}"
