#!/usr/bin/env bash
# Launch a `diffusion-lm` command with torchrun: one process per device, on one node or several.
#
#   one node, 8 GPUs:
#     NPROC=8 tools/launch_torchrun.sh fit --config configs/ettin-encoder-1b.yaml
#   4 nodes x 8 GPUs (run the same line on every node, NODE_RANK 0..3; node 0 is MASTER_ADDR):
#     NNODES=4 NODE_RANK=0 MASTER_ADDR=node0.cluster MASTER_PORT=29500 NPROC=8 \
#       tools/launch_torchrun.sh fit --config configs/ettin-encoder-1b.yaml --config configs/strategy/fsdp.yaml
#   CPU smoke test (2 processes over gloo):
#     NPROC=2 tools/launch_torchrun.sh fit --config configs/demo.yaml --trainer.max_steps=5
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  NPROC [GPUs on this node, else 1]
#   MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]  (the rendezvous of a static multi-node job)
#   PYTHON [python]  (the interpreter that has diffusion_lm installed)
#
# Lightning sees torchrun's variables (TorchElasticEnvironment) and the Trainer is told the same
# topology: --trainer.num_nodes=$NNODES --trainer.devices=$NPROC are appended after your arguments
# (after any --config, whose trainer.devices would otherwise win).
# The global batch is NNODES x NPROC x data.batch_size examples per optimizer step (docs/distributed.md).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m diffusion_lm "$@" --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC"
