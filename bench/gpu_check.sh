#!/usr/bin/env bash
# Everything that needs a GPU, in one pass and in order of importance: build the extension for this
# machine, the CUDA tests of the losses and views, training throughput (the step alone and through
# the loader, on generated ImageNet-like JPEGs, with the scripts' 8 loader workers, then 12 and 16),
# the whole test suite with the scripts on CUDA, the step under torch.compile, the fused losses
# against eager and compiled PyTorch. Each part has a time limit, so one that hangs does not take
# the rest with it. Logs go to OUTDIR (default gpu_check/); naming parts runs only those. The
# suite's part needs pytest-xdist, and tests/test_study.py submitit.
#
#     bash bench/gpu_check.sh [OUTDIR [PART...]]
set -u
out=${1:-gpu_check}
only=" ${*:2} "
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for bench/

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, logging to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ $only == "  " || $only == *" $name "* ]] || return 0
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "$(nproc) CPUs; $($py -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
part build 300 $py setup.py build_ext --inplace  # in place: pip may want to fetch setuptools
part cuda_tests 120 $py -m pytest -q -x tests/test_losses.py tests/test_data.py  # fused losses; colourise without syncs
part throughput 240 $py bench/train_throughput.py --fake-imagenet
# Loader workers against the training process's cores (BENCHMARKS.md: loader + step ran at 55% of the step).
part workers 300 bash -c "for w in 12 16; do $py bench/train_throughput.py --methods simclr --fake-imagenet --workers \$w; done"
part tests 240 $py -m pytest -q -n 12 -p no:cacheprovider tests
part compile 180 $py bench/train_throughput.py --methods simclr --no-loader --compile
part losses 180 $py bench/losses.py --device cuda --repeats 10
