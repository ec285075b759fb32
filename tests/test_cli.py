"""The terminal chat, driven through its standard input like a person would."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(checkpoint, typed: str, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_runtime", "chat", "--model", str(checkpoint), *flags],
                          input=typed, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_chat_clear_and_exit(tiny_checkpoint):
    result = run_cli(tiny_checkpoint, "你好\nclear\n早上好\nexit\n", "--temperature", "0", "--max-length", "40",
                     "--quantize", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ChatGLM: ") == 2 and "(history cleared)" in result.stdout


def test_a_missing_checkpoint_is_one_clear_line(tmp_path):
    result = run_cli(tmp_path / "nowhere", "")
    assert result.returncode == 1
    assert "no such checkpoint directory" in result.stderr and "Traceback" not in result.stderr
