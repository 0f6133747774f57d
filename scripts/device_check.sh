#!/usr/bin/env bash
# The short GPU-machine check of a round (about 2 minutes): do files cross between machines, and how
# fast is the codec on the GPU? Carry .whl (bash ../shared/device/wheels.sh accelerate==1.15.0 psutil),
# .data/val (the validation photos) and .port/here, written on this CPU beforehand with
#   python scripts/portability_check.py --data .port/images --export .port/here
# where .port/images holds the first N validation photos (N=8 below). On the GPU machine:
#  1. the files from here decode to the latents recorded here, under every kernel setting there
#     (oneDNN ISAs, mkldnn off, ATen scalar, threads) and through a CUDA pipeline;
#  2. the same photos are encoded there, by a CPU and by a CUDA pipeline, into $OUT/port.tar
#     (tar -xf port.tar -C runs/port; then --verify runs/port/device-cpu and device-cuda here);
#  3. python -m app.bench --device cuda --json.
# Everything printed also comes back as $OUT/check.log.
set -uo pipefail
exec > >(tee "${OUT:?the device call sets OUT}/check.log") 2>&1
source scripts/device_site.sh
status=0
echo "files written on the development CPU, decoded here:"
python3 scripts/portability_check.py --verify .port/here --json "$OUT/here.json" 2>&1 | grep -v -i warn || status=1
for device in cpu cuda; do
  echo "encoded here with a $device pipeline:"
  python3 scripts/portability_check.py --device "$device" --data .port/images --export ".port/device-$device" 2>&1 \
    | grep -v -i warn || status=1
done
tar -cf "$OUT/port.tar" -C .port device-cpu device-cuda
timeout 60 python3 -m app.bench --device cuda --json 2>&1 | grep -v -i warn | tail -1
exit $status
