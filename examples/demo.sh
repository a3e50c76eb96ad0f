#!/usr/bin/env bash
# The main job, end to end, on the embedded default model (SmolLM2-135M-Instruct, CPU).
# Writes under ./demo/ and is safe to re-run: finished work is resumed, not redone.
set -euo pipefail
EXP_DIR="${DEMO_DIR:-demo}/experiments"
tracekit --version

# 1. contrastive generations for a shipped trait, with pooled activations captured on the fly
#    (6 pos + 6 neg rows; every layer 0-30; mean over response tokens and last prompt token)
tracekit generate --experiments-dir "$EXP_DIR" --experiment demo --trait refusal \
  --n-examples 6 --batch-size 6 --max-new-tokens 24 --seed 0 \
  --pooling response_avg,prompt_last

# 2. trait vectors per layer (mean difference pos - neg, paired by row id) + separation table
tracekit extract vectors --experiments-dir "$EXP_DIR" --experiment demo --trait refusal --force

# files: responses/{pos,neg}.csv, activations/*.npy|.pt, vectors/mean_diff_response_avg.npy
find "$EXP_DIR/demo/refusal" -maxdepth 2 -name '*.csv' -o -maxdepth 2 -name 'mean_diff_*.npy' | sort
