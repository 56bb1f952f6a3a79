"""Runs llama.cpp's convert_hf_to_gguf.py on a benchmark checkpoint.

Usage: llama_convert.py LLAMA_CPP_DIR MODEL_DIR [converter args...]

The benchmark checkpoints carry the bundled tiny model's byte-level BPE
tokenizer, whose pre-tokenizer hash the converter does not know; it is
declared "gpt-2" here (llama-bench runs on token ids, so the tokenizer does
not change what is measured). Nothing else about the conversion changes.
"""

import sys

llama = sys.argv[1]
sys.path[:0] = [llama, llama + "/gguf-py"]

import convert_hf_to_gguf  # noqa: E402
from conversion import base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
convert_hf_to_gguf.main()
