"""EngineConfig and its helpers: sizes, validation naming the field, devices and dtypes."""
import pytest
import torch

from tandem.cli import build_parser
from tandem.config import (
    DTYPES,
    EngineConfig,
    default_kv_cache_memory,
    fast_bf16,
    parse_size,
)


@pytest.mark.parametrize("value, expected", [
    ("2GiB", 2 * 1024**3),
    ("512MiB", 512 * 1024**2),
    ("64kib", 64 * 1024),
    ("1GB", 10**9),
    ("3 MB", 3 * 10**6),
    ("1.5k", 1500),
    ("100b", 100),
    (" 7 ", 7),
    (1000, 1000),
    ("1e6", 10**6),
    ("2.5e3KiB", 2560000),
])
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "", "12 parsecs", "-5", "1e-3", "GiB", "2 GiB extra",
                                   True, None])
def test_parse_size_rejects_unreadable_values(value):
    with pytest.raises(ValueError, match=r"^kv_cache_memory: cannot read"):
        parse_size(value)


@pytest.mark.parametrize("value", [0, -1, "0", "0.1"])
def test_parse_size_rejects_non_positive_sizes(value):
    with pytest.raises(ValueError, match=r"^kv_cache_memory: must be positive"):
        parse_size(value)


def test_parse_size_names_the_field_it_reads():
    with pytest.raises(ValueError, match=r"^cache: "):
        parse_size("lots", name="cache")


# Strings that match parse_size's pattern ([0-9.eE+]+ then a unit) but are no number: they
# escape as float()'s own error (or an OverflowError), which names no field.
@pytest.mark.parametrize("value", ["e", "1.2.3GiB", "5EB", "++1", "1e999"])
def test_parse_size_names_the_field_for_malformed_numbers(value):
    with pytest.raises(ValueError, match=r"^kv_cache_memory: "):
        parse_size(value)


def test_engine_config_defaults_and_size_parsing():
    c = EngineConfig(kv_cache_memory="512MiB")
    assert c.kv_cache_memory == 512 * 1024**2
    assert EngineConfig().kv_cache_memory is None
    assert (c.model, c.block_size, c.enable_prefix_caching) == ("smollm2", 16, True)


@pytest.mark.parametrize("field, value", [
    ("block_size", 0), ("block_size", -16), ("block_size", 2.5),
    ("max_num_batched_tokens", 0), ("max_num_seqs", 0), ("max_model_len", 0),
    ("dtype", "float8"), ("dtype", "fp32"), ("device", "tpu"), ("device", "cuda0"),
    ("kv_cache_memory", "lots"), ("kv_cache_memory", 0),
    ("attention_backend", "flash"), ("max_cudagraph_batch", 0), ("max_cudagraph_batch", 1.5),
])
def test_engine_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        EngineConfig(**{field: value})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_engine_config_accepts_devices(device):
    assert EngineConfig(device=device).device == device


@pytest.mark.dtype_sensitive
def test_torch_device_and_dtype():
    c = EngineConfig(device="cpu", dtype="float32")
    assert c.torch_device == torch.device("cpu") and c.torch_dtype is torch.float32
    assert EngineConfig(device="cpu", dtype="bfloat16").torch_dtype is torch.bfloat16
    assert EngineConfig(device="cpu", dtype="float16").torch_dtype is torch.float16
    auto = EngineConfig(device="cpu").torch_dtype
    assert auto is (torch.bfloat16 if fast_bf16(torch.device("cpu")) else torch.float32)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert EngineConfig().torch_device.type == expected
    assert set(DTYPES) == {"auto", "float32", "bfloat16", "float16"}


def test_fast_bf16_is_a_bool():
    assert isinstance(fast_bf16(torch.device("cpu")), bool)


def test_fast_bf16_without_cpuinfo(monkeypatch):
    def no_file(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.delenv("TANDEM_CPU_BF16", raising=False)
    monkeypatch.setattr("builtins.open", no_file)
    assert fast_bf16(torch.device("cpu")) is False


def test_fast_bf16_follows_cpuinfo_flags(monkeypatch, tmp_path):
    monkeypatch.delenv("TANDEM_CPU_BF16", raising=False)
    real_open = open
    for flags, want in (("fma avx2 f16c", False), ("avx2 avx512f avx512_bf16", True),
                        ("avx2 amx_bf16 amx_int8", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda path, *a, _i=info, **k: real_open(
            _i if path == "/proc/cpuinfo" else path, *a, **k))
        assert fast_bf16(torch.device("cpu")) is want, flags


@pytest.mark.parametrize("value", ["0", "1"])
def test_tandem_cpu_bf16_overrides_the_probe(monkeypatch, value):
    monkeypatch.setenv("TANDEM_CPU_BF16", value)
    assert fast_bf16(torch.device("cpu")) is (value == "1")
    want = torch.bfloat16 if value == "1" else torch.float32
    assert EngineConfig(device="cpu").torch_dtype is want


def test_tandem_cpu_bf16_rejects_other_values(monkeypatch):
    monkeypatch.setenv("TANDEM_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="TANDEM_CPU_BF16"):
        fast_bf16(torch.device("cpu"))


def test_default_kv_cache_memory_on_cpu():
    n = default_kv_cache_memory(torch.device("cpu"))
    assert isinstance(n, int) and 0 < n <= 2 * 1024**3


def test_triton_attention_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^attention_backend: triton runs on CUDA"):
        EngineConfig(device="cpu", attention_backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert EngineConfig(device="cpu", attention_backend="triton").attention_backend == "triton"


def test_attention_backend_auto_is_triton_on_cuda_only():
    from tandem.attention.backend import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"


def test_from_args_maps_cli_flags_to_fields():
    args = build_parser().parse_args([
        "generate", "--prompt", "hi", "--model", "/m", "--dtype", "float32", "--device", "cpu",
        "--kv-cache-memory", "64MiB", "--block-size", "8", "--max-num-batched-tokens", "128",
        "--max-num-seqs", "4", "--max-model-len", "256", "--no-prefix-caching", "--seed", "3",
        "--attention-backend", "torch", "--max-cudagraph-batch", "64"])
    c = EngineConfig.from_args(args)
    assert c == EngineConfig(model="/m", dtype="float32", device="cpu",
                             kv_cache_memory=64 * 1024**2, block_size=8,
                             max_num_batched_tokens=128, max_num_seqs=4, max_model_len=256,
                             enable_prefix_caching=False, seed=3, attention_backend="torch",
                             max_cudagraph_batch=64)
    defaults = EngineConfig.from_args(build_parser().parse_args(["generate", "--prompt", "x"]))
    assert defaults == EngineConfig()


def test_enforce_eager_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("TANDEM_ENFORCE_EAGER", "1")
    assert EngineConfig().enforce_eager
    monkeypatch.setenv("TANDEM_ENFORCE_EAGER", "0")
    assert not EngineConfig().enforce_eager
    monkeypatch.setenv("TANDEM_ENFORCE_EAGER", "yes")
    with pytest.raises(ValueError, match="TANDEM_ENFORCE_EAGER: must be 0 or 1"):
        EngineConfig()
