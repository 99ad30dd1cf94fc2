#!/usr/bin/env bash
# First full call on the GPU machine, after the model parts were staged into /root/stage:
# copy the carried snapshot (.gpu-stage/run: src/ data/ tok/ whl/ and the last model part), start
# tools/gpu/pipeline.sh detached (it outlives this call), then wait and pack like collect.sh.
S=${STAGE:-/root/stage}; mkdir -p $S /root/res
mv .gpu-stage/run/part* $S/ 2>/dev/null
rm -rf $S/run && cp -r .gpu-stage/run $S/run
setsid nohup bash $S/run/src/tools/gpu/pipeline.sh > /root/res/pipeline.out 2>&1 < /dev/null &
sleep 5; cat /root/res/pipeline.out
bash $S/run/src/tools/gpu/collect.sh ${1:-540}
