"""`tandem generate | convert`: as a real process, and through `main()` in this process."""
import os
import subprocess
import sys

import pytest

from tandem.cli import build_parser, main


def tandem(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "tandem.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


@pytest.fixture(scope="module")
def tiny_dir(tiny_gguf, tmp_path_factory) -> str:
    """The tiny random Llama as an HF folder, converted by `tandem convert`: a model that
    loads in no time, for the paths that fail after loading."""
    dest = str(tmp_path_factory.mktemp("tiny") / "hf")
    assert main(["convert", tiny_gguf, dest]) == 0
    return dest


def test_convert_writes_a_checkpoint_folder(tiny_dir):
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(tiny_dir))


@pytest.mark.parametrize("prompt, chat", [("The capital of France is", []),
                                          ("What is the capital of France?", ["--chat"])],
                         ids=["plain", "chat"])
def test_generate_in_a_subprocess(smollm2_dir, prompt, chat):
    r = tandem("generate", "--model", smollm2_dir, "--prompt", prompt, *chat,
               "--max-tokens", "8", "--kv-cache-memory", "64MiB")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout  # greedy by default
    assert r.stdout.endswith("\n") and "<|im_" not in r.stdout


def test_generate_chat_in_process(smollm2_dir, capsys):
    rc = main(["generate", "--model", smollm2_dir, "--prompt", "What is the capital of France?",
               "--chat", "--max-tokens", "12", "--kv-cache-memory", "64MiB", "--dtype", "float32",
               "--stop", "zzz", "--top-k", "5", "--sampling-seed", "1", "--temperature", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out and "<|im_start|>" not in out and "assistant" not in out.lower()


def test_bad_sampling_flag_exits_2_naming_it(tiny_dir):
    r = tandem("generate", "--model", tiny_dir, "--prompt", "hi", "--temperature", "-1",
               "--kv-cache-memory", "1MiB")
    assert r.returncode == 2
    assert "temperature" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("args, field", [
    (["--kv-cache-memory", "lots"], "kv_cache_memory"),
    (["--block-size", "0"], "block_size"),
    (["--device", "tpu"], "device"),
    (["--model", "/no/such/model"], "model"),
])
def test_bad_engine_values_exit_2_naming_the_field(args, field, capsys):
    assert main(["generate", "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}: ")


@pytest.mark.parametrize("argv, word", [
    (["generate"], "--prompt"),
    (["generate", "--prompt", "hi", "--dtype", "float8"], "dtype"),
    (["generate", "--prompt", "hi", "--max-tokens", "many"], "max-tokens"),
    (["serve-everything"], "invalid choice"),
    ([], "command"),
])
def test_unparsable_arguments_exit_2(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert word in capsys.readouterr().err


def test_parser_reads_convert_and_sampling_flags():
    args = build_parser().parse_args(["convert", "model.gguf", "out"])
    assert (args.command, args.src, args.dest) == ("convert", "model.gguf", "out")
    args = build_parser().parse_args([
        "generate", "--prompt", "p", "--stop", "a", "--stop", "b", "--top-p", "0.5",
        "--min-p", "0.1", "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
        "--frequency-penalty", "-0.5", "--sampling-seed", "7"])
    assert args.stop == ["a", "b"] and args.top_p == 0.5 and args.min_p == 0.1
    assert (args.repetition_penalty, args.presence_penalty, args.frequency_penalty,
            args.sampling_seed) == (1.2, 0.5, -0.5, 7)
    assert args.temperature == 0.0 and args.max_tokens == 256 and not args.chat
