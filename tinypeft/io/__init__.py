"""Files: atomic writes, safetensors and JSON with clear errors, transformers/PEFT interchange."""

from .files import (
    atomic_write_bytes,
    check_regular_file,
    check_write_target,
    load_json,
    load_safetensors,
    read_file,
    save_json,
    save_safetensors,
)

__all__ = [
    "atomic_write_bytes",
    "check_regular_file",
    "check_write_target",
    "load_json",
    "load_safetensors",
    "read_file",
    "save_json",
    "save_safetensors",
]
