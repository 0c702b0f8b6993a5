#!/usr/bin/env bash
# Build the Snakemake report from the existing results and screenshot it in headless Chromium:
# the start page, the Figures category, and for each figure named on the command line its
# view (the image) and its details page (the caption).  Look at the PNGs afterwards.
#
#   scripts/check_report.sh [OUT_DIR] [FIGURE ...]      (default /tmp/report-check, fig1 and fig11)
#
# Needs chromium (Debian: apt-get install -y chromium).  The report is a single-page app, so a
# small script is appended to a copy of it that clicks "Figures" and then the figure's row
# (view) or its info button (details).  Extra snakemake options (another --configfile, e.g.
# one with `multitask: {enabled: false}` when results/multitask/ was never built, since every
# output marked for the report must exist) go in SNAKEMAKE_ARGS.  Note: snakemake rewrites
# results/config.resolved.yaml from the config it is given; run `snakemake -n` with your usual
# config afterwards to restore it.  The report itself is not committed.
set -euo pipefail
out=${1:-/tmp/report-check}
shift || true
figs=("$@")
[ ${#figs[@]} -gt 0 ] || figs=(fig1_unified_cross_domain.png fig11_experts.png)
mkdir -p "$out"
cd "$(dirname "$0")/.."
# shellcheck disable=SC2086
snakemake --profile profiles/local ${SNAKEMAKE_ARGS:-} --report "$out/report.html"
shot() {  # shot NAME HTML
    timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --window-size=1400,1400 --virtual-time-budget=15000 \
        --screenshot="$out/$1.png" "file://$2" >/dev/null 2>&1
}
click_copy() {  # click_copy DEST TARGET BUTTON  (TARGET "" = the Figures list only)
    python3 - "$out/report.html" "$1" "$2" "$3" <<'PY'
import sys
src, dest, target, button = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
js = """<script>
function leaves(t){return [...document.querySelectorAll('*')].filter(e=>e.childElementCount===0 && e.textContent.trim()===t);}
function figures(){const c=leaves('Figures');c[c.length-1].click();if(%(target)r)setTimeout(row,1500);}
function row(){const r=leaves(%(target)r);if(!r.length){return;}let el=r[0];
 for(let j=0;j<4 && el && el.querySelectorAll('a,button').length<2;j++){el=el.parentElement;}
 const bs=[...el.querySelectorAll('a,button')];(bs[%(button)d]||r[0]).click();}
window.addEventListener('load',()=>setTimeout(figures,1500));
</script>""" % {"target": target, "button": button}
html = open(src).read()
a, b = html.rsplit("</body>", 1)
open(dest, "w").write(a + js + "</body>" + b)
PY
}
shot start "$out/report.html"
click_copy "$out/figures.html" "" 0 && shot figures "$out/figures.html"
for f in "${figs[@]}"; do
    click_copy "$out/view.html" "results/figures/$f" 0 && shot "${f%.png}_view" "$out/view.html"
    click_copy "$out/info.html" "results/figures/$f" 1 && shot "${f%.png}_caption" "$out/info.html"
done
ls -1 "$out"/*.png
