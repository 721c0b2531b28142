"""llama.cpp's own C++ server (`llama-server`) as a peer for benchmarks, and its GGUF files.

Nothing here is a dependency of Tandem: the source is the llama.cpp that the llama-cpp-python
sdist vendors (pip downloads the sdist; cmake builds only `llama-server`, about 10 minutes on
2 cores), and the 16-bit GGUF is converted by llama.cpp's own script in a separate venv. Both
land under `.bench/` once and are reused after.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from router_peers import ROOT, free_port, process

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
BENCH = ROOT / ".bench"
SOURCE = BENCH / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
PEER_VENV = BENCH / "peer-venv"
F16_GGUF = BENCH / "smollm2-f16.gguf"
# convert_hf_to_gguf.py's imports. torch goes in first and alone, pinned to the CPU wheel this
# machine holds; the rest with ranges it satisfies, so pip never swaps in a CUDA build.
TORCH = "torch==2.13.0"
CONVERT_DEPS = ["numpy>=2.2.6", "sentencepiece>=0.1.98,<0.3.0", "transformers>=4.57,<6",
                "safetensors", "protobuf>=4.21,<5", "tqdm", "pyyaml", "requests"]
# Release, this CPU's own instruction set (-march=native), just the server.
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
# GCC keeps an explicit -mno-* over what -march=native turns on, whatever their order.
NO_AMX = ["-DCMAKE_C_FLAGS=-mno-amx-int8", "-DCMAKE_CXX_FLAGS=-mno-amx-int8"]


# An AVX2-only x86 CPU's build (the AMD EPYCs without AVX-512: avx2, fma, f16c), for a machine
# that has more: CMake takes the last -D of a name, so these override GGML_NATIVE=ON.
AVX2_ONLY = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
             "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"]


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f
                     if line.startswith("flags")), set())


def llama_source() -> Path:
    """The vendored llama.cpp tree, from the sdist pip downloads when it is not here yet."""
    if not (SOURCE / "CMakeLists.txt").is_file():
        print(f"downloading the {LLAMA_CPP_PYTHON} sdist into {BENCH} ...", file=sys.stderr)
        BENCH.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", LLAMA_CPP_PYTHON, "-d", str(BENCH)], check=True)
        sdist = next(BENCH.glob("llama_cpp_python-0.3.36.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(BENCH, filter="data")
    return SOURCE


def build(build_dir: str, extra: list[str]) -> Path:
    binary = SOURCE / build_dir / "bin" / "llama-server"
    if binary.is_file():
        return binary
    src = llama_source()
    print(f"building llama-server in {src / build_dir} (about 10 minutes on 2 cores) ...",
          file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / build_dir), *CMAKE_ARGS, *extra],
                   check=True)
    subprocess.run(["cmake", "--build", str(src / build_dir), "--target", "llama-server",
                    f"-j{os.cpu_count() or 1}"], check=True)
    return binary


def llama_server(probe_gguf: str, isa: str = "native") -> tuple[Path, str]:
    """The llama-server binary and a line saying how it was built. Where the CPU has AMX int8,
    one request to `probe_gguf` (Q4_1 takes ggml's AMX path) checks it does not crash; if it
    does, the server is built again with AMX off. isa="avx2": built for AVX2 only."""
    if isa == "avx2":
        return build("build-avx2", AVX2_ONLY), "AVX2 only (GGML_NATIVE=OFF, AVX2/FMA/F16C on)"
    binary = build("build", [])
    if "amx_int8" not in cpu_flags():
        return binary, "GGML_NATIVE=ON; no AMX on this CPU, so no AMX path to turn off"
    cmd, url, env = llama_cmd(binary, probe_gguf, slots=1, ctx=512, threads=2)
    try:
        with process(cmd, url, env=env):
            return binary, "GGML_NATIVE=ON, AMX int8 on and working"
    except RuntimeError as e:
        print(f"llama-server with AMX int8 failed ({e}); building with it off", file=sys.stderr)
        return build("build-noamx", NO_AMX), "GGML_NATIVE=ON, AMX int8 OFF: it crashed here"


def llama_cmd(binary: Path, gguf: str, slots: int, ctx: int, threads: int
              ) -> tuple[list[str], str, dict[str, str]]:
    """`slots` parallel sequences with continuous batching; llama-server splits `ctx` among
    them. The library path stands in for the build's RPATH, which may name another folder."""
    port = free_port()
    cmd = [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-cb", "-t", str(threads), "-c", str(ctx)]
    return cmd, f"http://127.0.0.1:{port}", {"LD_LIBRARY_PATH": str(binary.parent)}


def llama_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False,
                         env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)})
    return next((line.removeprefix("version:").strip() for line in
                 (out.stdout + out.stderr).splitlines() if line.startswith("version")), "?")


def peer_python() -> str:
    """The peer venv's python, with convert_hf_to_gguf.py's imports in it."""
    py = PEER_VENV / "bin" / "python"
    probe = [str(py), "-c", "import sentencepiece, torch, transformers, safetensors"]
    if not py.exists() or subprocess.run(probe, check=False, capture_output=True).returncode:
        print(f"installing the GGUF converter's packages into {PEER_VENV} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, TORCH, *CONVERT_DEPS], check=True)
    return str(py)


def f16_gguf(hf_folder: str, dest: Path = F16_GGUF) -> Path:
    """`hf_folder` converted to a 16-bit GGUF by llama.cpp's own script, once."""
    if dest.is_file():
        return dest
    src = llama_source()
    tmp = dest.with_suffix(".part")
    subprocess.run([peer_python(), str(src / "convert_hf_to_gguf.py"), hf_folder,
                    "--outtype", "f16", "--outfile", str(tmp)], check=True,
                   env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    tmp.rename(dest)  # a crash leaves no file that looks finished
    return dest
