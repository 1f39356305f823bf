#!/usr/bin/env bash
# One-time set-up: a Python virtual environment in .venv with ONNX Runtime (dlm-guide loads its
# shared library from there) and tritonclient, and .venv-interop with Seldon MLServer (the interop
# test's third-party OIP server), and Debian's syntax labellers. `--train` adds JAX and jax2onnx for
# guide training.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
req=deploy/requirements-serve.txt
[ "${1:-}" = "--train" ] && req=guide/train/requirements.txt
stamp=".venv/.installed-$(sha256sum "$req" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
ls .venv/lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so* >/dev/null
# The Python client, from the checkout (re-installed when its files change).
stamp=".venv/.client-$(cat clients/python/pyproject.toml clients/python/dlm/*.py | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps ./clients/python
  touch "$stamp"
fi
# Debian's Chromium and ChromeDriver, for the playground's browser test (as root, when missing).
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  as_root=""; [ "$(id -u)" = 0 ] || as_root="sudo -n"
  $as_root apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
    { $as_root apt-get update -q >/dev/null && $as_root apt-get install -y -q chromium chromium-driver >/dev/null; } ||
    echo "setup: could not install chromium/chromium-driver (the playground test needs them)" >&2
fi
# The syntax guides' labellers, Debian's Lingua::EN::Tagger and link grammar parser: for guide training,
# eval-syntax and the syntax test, never for serving (guide/train/syntax_labels.py records their
# versions with the labels).
if command -v apt-get >/dev/null && ! { /usr/bin/python3 -c "import linkgrammar" && perl -MLingua::EN::Tagger -e1; } 2>/dev/null; then
  as_root=""; [ "$(id -u)" = 0 ] || as_root="sudo -n"
  labellers="python3-link-grammar link-grammar-dictionaries-en liblingua-en-tagger-perl"
  $as_root apt-get install -y -q $labellers >/dev/null 2>&1 ||
    { $as_root apt-get update -q >/dev/null && $as_root apt-get install -y -q $labellers >/dev/null; } ||
    echo "setup: could not install the syntax labellers (python3-link-grammar, liblingua-en-tagger-perl)" >&2
fi
# .venv-interop: Seldon MLServer, a third-party OIP server the interop test serves our guide with.
python3 -m venv .venv-interop
stamp=".venv-interop/.installed-$(sha256sum deploy/requirements-interop.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv-interop/bin/pip install --quiet --disable-pip-version-check -r deploy/requirements-interop.txt
  touch "$stamp"
fi
