#!/usr/bin/env bash
# The main job, end to end, on the embedded default model (SmolLM2-135M-Instruct, CPU).
# Every verb of tracekit runs once on small inputs; everything is written under ./demo/
# (DEMO_DIR moves it). Safe to re-run: finished work is resumed or skipped, not redone.
set -euo pipefail
D="${DEMO_DIR:-demo}"
EXP_DIR="$D/experiments"
STEER_LAYER=12
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
tracekit --version

# The demo's trait is 'french' (answer in French vs in English): the embedded 135M model follows
# that instruction, and a word list measures it independently of any judge. (It does not follow
# a 'refusal' instruction: a vector of that would separate texts, not behaviour.)
step "1. generate: contrastive pos/neg responses for the shipped 'french' trait, capturing"
step "   pooled activations of every layer (0-30) during generation"
tracekit generate --experiments-dir "$EXP_DIR" --experiment demo --trait french \
  --n-examples 6 --batch-size 6 --max-new-tokens 24 --seed 0 \
  --pooling response_avg,prompt_last

step "2. extract vectors: per-layer mean difference pos - neg (paired by row id) + separation table"
tracekit extract vectors --experiments-dir "$EXP_DIR" --experiment demo --trait french --force

step "3. judge: score the positive responses 0-100 with the local embedded judge"
step "   (a 135M judge is for plumbing, not for research conclusions; --min-mass 0 keeps its scores)"
tracekit judge --input "$EXP_DIR/demo/french/responses/pos.csv" --trait french \
  --backend local --min-mass 0 --output "$D/judged/pos_scored.csv" --force

step "4. decode: the generation cache (.npy) -> JSON (generate wrote it whole; here the first 3)"
tracekit decode --base-dir "$EXP_DIR" --format json --limit 3 --force

step "5. extract features: one forward pass per batch over labelled sentences, SAE-encoded"
python "$(dirname "$0")/make_example_saes.py" "$D/saes" --release-layers 0-4,9 --width 256 --l0 16 \
  --sentences "$(dirname "$0")/sentences.csv"
tracekit extract features --sentences "$(dirname "$0")/sentences.csv" --layers 1-5,10 \
  --sae "$D/saes" --sae-storage sparse --output "$D/features" --force

step "6. build-dataset: classifier datasets from the feature files (all three strategies)"
tracekit build-dataset --strategy hidden-to-concept --input "$D/features" --layers 1-5 \
  --test-fraction 0.25 --seed 0 --output "$D/datasets/h1-5_to_concept.npz" --force
tracekit build-dataset --strategy hidden-to-feature --input "$D/features" \
  --target-layer 3 --target-feature 7 --output "$D/datasets/h3_to_f7.npz" --force
tracekit build-dataset --strategy embedding-to-feature --input "$D/features" \
  --target-layer 3 --target-feature 7 --normalize minmax --output "$D/datasets/emb_to_f7.npz" --force

step "7. log + reconstruct: activations to LMDB keyed by prompt hash, then the inference JSONL"
tracekit log --qa "$(dirname "$0")/qa.jsonl" --lmdb "$D/acts.lmdb" --layers 15,30 \
  --max-new-tokens 16 --batch-size 6
tracekit log stats "$D/acts.lmdb"
tracekit reconstruct --qa-output-path "$(dirname "$0")/qa.jsonl" --lmdb-path "$D/acts.lmdb" \
  --output-path "$D/reconstructed.jsonl" --force

step "8. steer: add coef x the layer-$STEER_LAYER vector while answering the questions with no"
step "   instruction, one output set per coefficient, and the same sweep along a random direction"
step "   of the same norm (the control); greedy, so the sweep is deterministic"
tracekit generate --experiments-dir "$EXP_DIR" --experiment demo --trait french \
  --steer-vector "$EXP_DIR/demo/french/vectors/mean_diff_response_avg.npy" \
  --steer-layer "$STEER_LAYER" --steer-coef=-1,0,1,2 --steer-control random \
  --n-examples 15 --batch-size 15 --max-new-tokens 24 --temperature 0 \
  --no-extract-activations --no-generation-cache

step "9. dose-response: the fraction of French function words per coefficient (a measure"
step "   independent of the judge), vector against the random control, table + PNG"
tracekit report steering --experiments-dir "$EXP_DIR" --experiment demo --trait french \
  --measure "words:$(dirname "$0")/french_words.txt" --force

# defaults for commands run inside the demo folder (README: "After the demo")
cat > "$D/tracekit.toml" <<'TOML'
# Written by examples/demo.sh: options that tracekit commands run in this folder take when
# neither the command line nor --config gives them.
[build-dataset]
strategy = "hidden-to-concept"
input = "features"
output = "datasets/card.npz"
test_fraction = 0.25
seed = 0
force = true
TOML

step "done: outputs under $D/"
pictures=$(find "$D" -name '*.png' | sort)
if [ -n "$pictures" ]; then
  printf 'pictures:\n' >&2
  printf '  %s\n' $pictures >&2
else
  printf 'pictures: none\n' >&2
fi
printf '\nnext, in %s/:\n  tracekit decode --format md --limit 10\n  tracekit build-dataset --layers 0-2,10\n  tracekit log stats acts.lmdb\n' "$D" >&2
