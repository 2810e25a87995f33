"""The documented limits on hostile or broken input: past each, bnaudit refuses with exit 2.

Each bound is far above what a real checkpoint, data file or name needs, and low enough that a
file of a few hundred bytes cannot make an audit take minutes or gigabytes. docs/security.md
lists them with the reason for each.
"""

from __future__ import annotations

# Checkpoints
MAX_PICKLE_BYTES = 64 << 20  # data.pkl: ~100 bytes per tensor, so room for 600,000 tensors
MAX_BN_ELEMENTS = 1 << 24  # channels of one BN layer (16.7 M; the widest real ones have ~10^4)
MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of JSON (a 10^4-tensor LLM shard has ~1 MB)
MAX_SAFETENSORS_KEYS = 65_536  # tensors in one safetensors file
MAX_KEY_NODES = 1 << 16  # elements of one tuple a pickle hashes (a dict key, a set member),
# nested tuples counted as often as they are referenced: a state dict's keys are strings
MAX_ONNX_BYTES = (2 << 30) - 1  # an ONNX file with its external data: protobuf's own 2 GiB cap
MAX_ONNX_NODES = 50_000  # nodes of every graph (exported CNNs have 10^2-10^4, LLM layers ~2*10^4)

# Sample batches (--data)
MAX_DATA_BYTES = 4 << 30  # a data file's tensors, expanded (10^4 images of 3x224x224 is 6 GB
# in float32: 10^3 samples are enough to calibrate, see BN-NOTES)
MAX_INFLATION = 100  # how much a deflated .npz member may expand (real arrays: 1-10x)
DEFAULT_MAX_BATCHES = 1000  # more batches than this need --batches (each costs a forward)

# Messages
MAX_NAME_CHARS = 120  # an untrusted name (key, layer, file) quoted in a message is cut here
MAX_MESSAGE_CHARS = 2000  # one error line, whatever it quotes
