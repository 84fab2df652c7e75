#!/usr/bin/env bash
# Behaviour snapshot for refactors (issue 17): what the workflow plans and what the smoke tables hold.
#   scripts/behaviour_snapshot.sh OUT_DIR    (then: diff -r BEFORE_DIR AFTER_DIR, or compare SUMMARY files)
# Writes OUT_DIR/plan_<config>.txt: every job of the dry run (--forceall) of the default config (all tables,
# NAS, supernet, OQAT, deploy) and of the main job, one line per job: rule, wildcards and shell command, sorted
# (Snakemake's "reason"/resources lines dropped: they are not what the job does); OUT_DIR/smoke/: the smoke
# config's tables, run for real on CPU (~2-4 min on 2 cores), and a copy of each without its wall-time columns
# (*.notime.csv: the part that must not change); OUT_DIR/SUMMARY: sha256 of each of them.
set -euo pipefail
out=$(realpath -m "${1:?usage: scripts/behaviour_snapshot.sh OUT_DIR}")
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out/smoke"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

plan() {  # plan NAME [snakemake args...]: the dry run's jobs as sorted one-line records
    local name=$1; shift
    (cd "$repo" && "$py" -m snakemake -n -p --forceall --cores 2 --directory "$work/plan_$name" -s workflow/Snakefile "$@") \
        > "$work/plan_$name.raw" 2>&1
    "$py" - "$work/plan_$name.raw" > "$out/plan_$name.txt" <<'EOF'
import re, sys
jobs, cur = [], None
for line in open(sys.argv[1]):
    line = line.rstrip("\n")
    m = re.match(r"^(?:local)?rule (\w+):$", line)
    if m:
        cur = {"rule": m.group(1), "wildcards": "", "shell": ""}
        jobs.append(cur)
    elif cur is not None and line.startswith("    wildcards: "):
        cur["wildcards"] = line.strip()
    elif cur is not None and line.startswith("Shell command: "):
        cur["shell"] = line[len("Shell command: "):]
print("\n".join(sorted(f"{j['rule']} | {j['wildcards']} | {j['shell']}" for j in jobs)))
EOF
}

tables=(results/tables/hast.csv results/tables/hast_ablation.csv results/tables/hast_calib.csv
        results/tables/zsq_budget.csv results/tables/zsq_budget_gen1000.csv results/tables/trs.csv
        results/tables/lbt.csv results/tables/nas.csv results/tables/supernet.csv
        results/tables/supernet_search.csv results/tables/oqat.csv results/tables/deploy.csv)
plan default "${tables[@]}"
plan main results/tables/hast.csv results/tables/deploy.csv --configfile config/main.yaml

smoke_tables=(results/tables/hast.csv results/tables/nas.csv results/tables/supernet.csv
              results/tables/supernet_search.csv results/tables/oqat.csv)
(cd "$repo" && "$py" -m snakemake "${smoke_tables[@]}" --cores 2 --directory "$work/smoke" -s workflow/Snakefile \
    --configfile config/smoke.yaml) > "$out/smoke.log" 2>&1 || { tail -20 "$out/smoke.log"; exit 1; }
for t in "${smoke_tables[@]}"; do cp "$work/smoke/$t" "$out/smoke/"; done
cp "$work/smoke/results/tables/oqat_pareto.csv" "$out/smoke/"
# the tables also report wall times, which differ run to run: a copy without them compares byte for byte
"$py" - "$out/smoke" <<'EOF2'
import re, sys
from pathlib import Path
import pandas as pd
for p in sorted(Path(sys.argv[1]).glob("*.csv")):
    if not p.name.endswith(".notime.csv"):
        t = pd.read_csv(p, dtype=str, keep_default_na=False)
        t.drop(columns=[c for c in t.columns if re.search(r"time_s", c)]).to_csv(p.with_suffix(".notime.csv"), index=False)
EOF2

(cd "$out" && sha256sum plan_*.txt smoke/*.notime.csv smoke/*.csv | sort -u -k2) > "$out/SUMMARY"
wc -l "$out"/plan_*.txt | sed '$d'
cat "$out/SUMMARY"
