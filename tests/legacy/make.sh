#!/bin/bash
# usage: make.sh REPO OUTNAME
set -e
repo=$1; name=$2; q=$repo/.venv/bin/quackae
cd /tmp/legacy; rm -rf $name; mkdir $name; cd $name
export OMP_NUM_THREADS=1
$q prepare ../corpus.jsonl --out prepared --vocab-size 300 --max-length 16
$q train prepared --out run --embed-size 8 --hidden-size 16 --max-steps 4 --batch-size 8 --val-fraction 0.2 --test-fraction 0.1 --precision 32-true
$q encode prepared --model run --out store-shards --batch-size 8 --shard-size 16
$q encode prepared --model run --out store-files --layout files --batch-size 8
echo OK
