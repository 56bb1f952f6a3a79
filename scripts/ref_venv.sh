# Sourced by the reference scripts: makes sure the virtualenv with the
# Hugging Face reference exists and sets $VENV to it.
VENV=${MYRIAD_REF_VENV:-/tmp/myriad-ref-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch transformers==5.23.0 safetensors tokenizers accelerate
fi
