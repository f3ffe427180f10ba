#!/usr/bin/env bash
# The default-model recipe sized for one CUDA GPU (bf16 autocast, DataLoader workers, larger batches,
# more scenes); the stages and their YAML files are those of scripts/train_default.sh.
#   bash scripts/train_default_gpu.sh          (about 11 minutes on one H100)
# Every stage runs for a fixed number of minutes with its learning rate warming up and annealing over
# exactly that time (train.schedule: minutes), so the recipe fits a lent machine's time budget whatever
# its speed: CLIP_MINUTES, ALIGN_MINUTES, INSTRUCT_MINUTES. STAGES splits it over several sessions.
# The projector was chosen on the CPU run (assistant/default_model/projector_comparison.json); set
# PROJECTORS="mlp2x_gelu qformer" to compare again.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-12}
export SCENES=${SCENES:-32000} PROJECTORS=${PROJECTORS:-mlp2x_gelu} STEPS=0
export STAGE0_EXTRA="train.batch_size=256 train.lr=1.0e-3 train.epochs=1000 train.schedule=minutes train.max_minutes=${CLIP_MINUTES:-2.5} data.num_workers=$WORKERS ${STAGE0_EXTRA:-}"
export STAGE1_EXTRA="train.batch_size=64 train.lr=2.0e-3 train.epochs=10 train.schedule=minutes train.max_minutes=${ALIGN_MINUTES:-0.5} data.num_workers=$WORKERS ${STAGE1_EXTRA:-}"
export STAGE2_EXTRA="train.batch_size=64 train.lr=6.0e-4 train.projector_lr=6.0e-4 train.vision_lr=2.0e-4 train.epochs=100 train.eval_every=100000 train.save_every=500 data.num_workers=$WORKERS train.schedule=minutes train.max_minutes=${INSTRUCT_MINUTES:-5} ${STAGE2_EXTRA:-}"
export WORKERS
exec bash scripts/train_default.sh
