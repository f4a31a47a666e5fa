#!/usr/bin/env bash
# Regenerate the committed fidelity baseline: the plain int8 export of the trained stand-in
# (lesion-x448) against its fp32 export on the evaluation images, as the suite measures it.
# tests/fidelity_cli.rs runs the same comparison on the `unseen` image set and holds it to this
# baseline within the bands in baselines/bands.toml (reasons in docs/FIDELITY.md).
#
#   crates/fidelity/baselines/generate.sh     (after `dermedge models build lesion-x448`)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$root"
bin="${DERMEDGE_BIN:-target/debug/dermedge}"
model=.cache/models/lesion-x448
report="$(mktemp -d)"
"$bin" fidelity --threads 2 --reference "$model/lesion-x448.fp32.toml" \
  --candidate "$model/lesion-x448.int8.toml" --images .cache/models/images/evaluation \
  --report "$report" || true   # the plain export fails its gates; the baseline records that
python3 - "$report/report.json" > crates/fidelity/baselines/lesion-x448.int8.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["comparison"]
print(json.dumps({
    "what": "lesion-x448 int8 vs fp32 (plain full-integer export), evaluation images",
    "images": c["images"],
    "verdict": r["verdict"],
    "centred_cosine_median": c["centred_cosine"]["median"],
    "centred_cosine_p1": c["centred_cosine"]["p1"],
    "raw_centred_cosine_median": c["raw_centred_cosine"]["median"],
    "head_view_delta_p99": c["head_view_delta"]["p99"],
    "probe_snr_db": c["probe_snr_db"],
    "sqnr_db_median": c["sqnr_db"]["median"],
    "sqnr_db_p1": c["sqnr_db"]["p1"],
    "top10_overlap_mean": c["top10_overlap"]["mean"],
    "self_retrieval": c["self_retrieval"],
    "spearman": c["pairwise_similarity_spearman"],
}, indent=1))
PY
rm -rf "$report"
cat crates/fidelity/baselines/lesion-x448.int8.json
