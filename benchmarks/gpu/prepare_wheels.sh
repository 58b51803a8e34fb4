#!/usr/bin/env bash
# Download, on this (CPU) machine, the wheels device_checks.sh installs on the GPU machine, which reaches no package
# index: the versions installed in .venv of transformers, PEFT, bitsandbytes and the packages they import that the
# GPU image lacks or has in older versions, for CPython 3.12 on x86-64 Linux. The bitsandbytes wheel keeps only its
# CPU and CUDA 13 libraries (43 MB -> about 4 MB), so that the working tree stays under the 64 MiB a device call
# carries. Writes .whl/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV_PY=${VENV_PY:-.venv/bin/python}
PACKAGES="transformers peft bitsandbytes huggingface_hub tokenizers safetensors httpx2 httpcore2 truststore anyio idna h11 regex"
pins=$("$VENV_PY" - $PACKAGES <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
rm -rf .whl && mkdir -p .whl
platforms=""
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $tag"
done
# shellcheck disable=SC2086
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms -d .whl $pins
"$VENV_PY" - <<'PY'
import re
import zipfile
from pathlib import Path

keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
for wheel in Path(".whl").glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        dropped = {n for n in source.namelist() if n.endswith(".so") and not keep.search(n)}
        for item in source.infolist():
            if item.filename in dropped:
                continue
            data = source.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(l for l in lines if l.split(",")[0] not in dropped) + "\n").encode()
            target.writestr(item, data)
    slim.replace(wheel)
    print(f"{wheel.name}: dropped {len(dropped)} libraries, {wheel.stat().st_size / 2**20:.1f} MiB")
PY
du -sh .whl
ls .whl
