# Sourced by the GPU scripts: makes fxkd and its dependencies importable on a machine without
# network (wheels of missing dependencies, e.g. torch-pruning, in .whl/) and prints the card.
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('card:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" \
    || exit 1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fxkd-site .whl/*.whl \
        && export PYTHONPATH=/tmp/fxkd-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -P -c "import fxkd.passes" 2>/dev/null \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
if ! python3 -P -c "import fxkd.passes" 2>/dev/null; then  # no editable install: a copy
    mkdir -p /tmp/fxkd-shim/fxkd && cp -r fxkd/. /tmp/fxkd-shim/fxkd/ \
        && cp -r passes /tmp/fxkd-shim/fxkd/passes
    export PYTHONPATH=/tmp/fxkd-shim${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -P -c "import fxkd.passes, torch_pruning" || exit 1
