#!/usr/bin/env bash
# Runs inside the localstack/localstack container once SQS and SNS are ready
# (docker-compose.yml mounts this folder at /etc/localstack/init/ready.d).
# Creates the same queues as scripts/services.sh does in host mode.
set -euo pipefail
awslocal sqs create-queue --queue-name transfer-events.fifo --attributes FifoQueue=true
awslocal sqs create-queue --queue-name transfer-events
