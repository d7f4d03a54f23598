#!/bin/bash
# 1 process (1 thread), 1 process (2 threads), 2 torchrun processes (1 thread each): Phase-1 size, stdlib, 150 steps.
source "$(dirname "$0")/../.venv/bin/activate"
mkdir -p "${OUT:-runs/ddp-speedup}" && cd "${OUT:-runs/ddp-speedup}"
ARGS="--corpus stdlib --steps 150 --eval-every 150 --checkpoint-every 150 --eval-batches 1"
for round in 1 2; do
  uptime
  rm -rf one$round two$round onet2$round
  bayes-router --threads 1 train --out one$round $ARGS > /dev/null 2>&1
  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m bayes_router --threads 1 train --out two$round $ARGS > /dev/null 2>&1
  bayes-router --threads 2 train --out onet2$round $ARGS > /dev/null 2>&1
  for d in one$round onet2$round two$round; do python -c "import json; m=json.load(open('$d/metrics.json')); print('$d', round(m['train_seconds'],1), 's')"; done
done
uptime
