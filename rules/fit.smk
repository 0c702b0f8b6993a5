# Fit the laws to the losses table and draw the figures.


rule fit:
    input:
        LOSSES[0],
    output:
        FITS,
    params:
        fit=CFG["fit"],
        out=f"{RESULTS}/fits",
    log:
        f"{RESULTS}/logs/fit.log",
    conda:
        "../envs/mergelaws.yaml"
    shell:
        "mergelaws fit {input} --config {RESOLVED} --out {params.out} 2>&1 | tee {log}"


rule figures:
    input:
        losses=LOSSES[0],
        fits=FITS[0],
    output:
        FIGURES,
    params:
        out=f"{RESULTS}/figures",
    log:
        f"{RESULTS}/logs/figures.log",
    conda:
        "../envs/mergelaws.yaml"
    shell:
        "mergelaws figures --config {RESOLVED} --losses {input.losses} --fits {input.fits} "
        "--out {params.out} 2>&1 | tee {log}"
