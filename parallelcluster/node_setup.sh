#!/bin/bash
# ParallelCluster OnNodeConfigured action for fsdp_kit (upload to s3://$S3_BUCKET/fsdp_kit/node_setup.sh).
#   head node:    node_setup.sh REPO_URL   clones fsdp_kit to /fsx/fsdp_kit and builds /fsx/fsdp_kit/.venv
#   compute node: node_setup.sh            checks the GPUs and the EFA provider before the node takes jobs
set -euo pipefail

SHARED=/fsx/fsdp_kit
# shellcheck source=/dev/null
. /etc/parallelcluster/cfnconfig   # sets cfn_node_type (HeadNode | ComputeFleet)

if [[ "${cfn_node_type:-}" == "HeadNode" ]]; then
    repo_url=${1:?usage: node_setup.sh REPO_URL}
    if [[ ! -d "$SHARED/.git" ]]; then
        git clone --depth 1 "$repo_url" "$SHARED"
    fi
    python3 -m venv "$SHARED/.venv"
    # On the cluster torch comes from PyPI with CUDA; the pin keeps it the version the project tests.
    "$SHARED/.venv/bin/pip" install -q --upgrade pip
    "$SHARED/.venv/bin/pip" install -q -c "$SHARED/constraints.txt" -e "$SHARED"
    mkdir -p /fsx/data /fsx/outputs "$SHARED/logs/slurm"
    chmod -R a+rwX /fsx/outputs "$SHARED/logs"
else
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    /opt/amazon/efa/bin/fi_info -p efa -t FI_EP_RDM > /dev/null   # fails if the EFA provider is missing
fi
