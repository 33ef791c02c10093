#!/usr/bin/env bash
# Reproduce a paper's table with one method: scripts/reproduce.sh PRESET METHOD [lit-vce predict flags...]
#
#   scripts/reproduce.sh ace-imagenet dvce --data.root /data/imagenet/val
#   scripts/reproduce.sh celebahq-smile ace --data.root /data/CelebAMask-HQ
#
# PRESET is a protocol preset (`lit-vce configs | grep presets/`); a family such as ace-imagenet runs
# each of its task presets (ace-imagenet-zs, -cc, -ep), one run each, as the paper's rows. METHOD is a
# method config of the preset's domain (imagenet/, celeba/ or celebahq/methods/METHOD). Each run goes to
# $OUT/PRESET/METHOD (OUT defaults to runs/reproduce), is evaluated in its conventions and set beside the
# published figures: $OUT/published-PRESET.md. Runs resume where they stopped. Needs the weights the
# preset and the method name (`lit-vce fetch --config presets/P --config M` lists and loads them) and,
# for real data, a GPU (the presets ask for one; pass --trainer.accelerator cpu to try it small).
# Expected GPU time and memory, from a FLOP count, before starting (README, "Expected GPU cost"):
#   lit-vce cost --config presets/ace-imagenet-zs --config imagenet/methods/METHOD
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: scripts/reproduce.sh PRESET METHOD [lit-vce predict flags...]" >&2
    exit 2
fi
PRESET=$1; METHOD=$2; shift 2
cd "$(dirname "$0")/.."
LIT=${LIT_VCE_BIN:-}
if [ -z "$LIT" ]; then
    ./scripts/_setup.sh >&2
    LIT=.venv/bin/lit-vce
fi
OUT=${OUT:-runs/reproduce}
CONFIGS=$("$LIT" configs | sed -n 's/^  //p')
case "$PRESET" in
    celeba-*) DOMAIN=celeba ;;
    celebahq-*) DOMAIN=celebahq ;;
    *) DOMAIN=imagenet ;;
esac
if ! grep -qx "$DOMAIN/methods/$METHOD" <<<"$CONFIGS"; then
    echo "reproduce: no method config $DOMAIN/methods/$METHOD; for $PRESET: $(grep "^$DOMAIN/methods/" <<<"$CONFIGS" | sed "s#$DOMAIN/methods/##" | tr '\n' ' ')" >&2
    exit 2
fi
TASKS=$(grep "^presets/$PRESET-" <<<"$CONFIGS" | sed 's#presets/##' || true)
if [ -z "$TASKS" ]; then
    if ! grep -qx "presets/$PRESET" <<<"$CONFIGS"; then
        echo "reproduce: no preset $PRESET; presets: $(grep '^presets/' <<<"$CONFIGS" | sed 's#presets/##' | tr '\n' ' ')" >&2
        exit 2
    fi
    TASKS=$PRESET
fi
for TASK in $TASKS; do
    RUN="$OUT/$TASK/$METHOD"
    echo "== $TASK with $METHOD -> $RUN" >&2
    "$LIT" predict --config "presets/$TASK" --config "$DOMAIN/methods/$METHOD" --writer.output_dir "$RUN" "$@"
    "$LIT" evaluate "$RUN"
done
"$LIT" leaderboard "$OUT" --published "$PRESET" --formats md
