#!/usr/bin/env bash
# Regenerate docs/img/clinic_report.png: a headless-Chromium screenshot of `hf-clinic report` on a real run.
#
#   bash docs/screenshot_report.sh [RUN_DIR]
#
# 1. trains the demo run (tests/scripts/clinic_demo_run.py: 12-layer Post-LN BERT from scratch, LAMB, no warmup,
#    low clip threshold; a few minutes on 2 CPU cores) into RUN_DIR (default /tmp/hf-clinic-demo), unless it exists;
# 2. writes RUN_DIR/clinic_report.html with `hf-clinic report` (or `python -m hf_clinic.cli report`);
# 3. screenshots it with Debian's chromium (`apt-get install -y chromium`), headless, in a fresh profile, with every
#    network-facing feature off, crops the page to its content and stores it with a 256-colour palette (Pillow).
# Also writes docs/img/diagnose_amplification.png and docs/img/diagnose_dependency.png from `hf-clinic diagnose`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${1:-/tmp/hf-clinic-demo}"
OUT="$ROOT/docs/img"
PY="${PYTHON:-python}"
mkdir -p "$OUT"

if [ ! -f "$RUN_DIR/clinic_log.jsonl" ]; then
  "$PY" "$ROOT/tests/scripts/clinic_demo_run.py" "$RUN_DIR"
fi
"$PY" -m hf_clinic.cli report "$RUN_DIR" --no-progress

PROFILE="$(mktemp -d)"            # a new, empty Chromium profile every time
RAW="$(mktemp --suffix=.png)"
trap 'rm -rf "$PROFILE" "$RAW"' EXIT
# Chromium refuses to run as root without --no-sandbox; the page is a local file we just wrote.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$PROFILE" \
  --force-device-scale-factor=1 --window-size=1360,4200 --screenshot="$RAW" "file://$RUN_DIR/clinic_report.html" \
  2> >(grep -v -E "dbus|DBus|Fontconfig" >&2 || true)

# Crop the empty bottom of the tall window to the page content.
"$PY" - "$RAW" "$OUT/clinic_report.png" <<'EOF'
import sys
from PIL import Image, ImageChops

img = Image.open(sys.argv[1]).convert("RGB")
background = Image.new("RGB", img.size, img.getpixel((img.width - 1, img.height - 1)))
box = ImageChops.difference(img, background).getbbox()
bottom = min(img.height, (box[3] if box else img.height) + 24)
# 256-colour palette: a third of the size, indistinguishable for flat UI colours and line plots.
img.crop((0, 0, img.width, bottom)).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
print(f"wrote {sys.argv[2]} ({img.width}x{bottom})")
EOF

# The vanilla-vs-Admin profile of a deep Post-LN BERT in the from-scratch setting.
DIAG="$(mktemp -d)"
"$PY" -m hf_clinic.cli diagnose bert --set num_hidden_layers=12 --set hidden_size=128 --set num_attention_heads=4 \
  --set intermediate_size=512 --init paper --no-progress -o "$DIAG"
cp "$DIAG/amplification.png" "$OUT/diagnose_amplification.png"
cp "$DIAG/dependency.png" "$OUT/diagnose_dependency.png"
rm -rf "$DIAG"
echo "wrote $OUT/diagnose_amplification.png $OUT/diagnose_dependency.png"
