# Sourced by the device scripts: the carried wheels (.whl, from ../shared/device/wheels.sh) installed
# into .site and put on PYTHONPATH; the GPU machine lacks diffusers, compressai, lpips, pytorch-msssim.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site
fi
