import json
import time

import pytest

from model_runtime.tiny.glm6b import write_tiny_tokenizer
from model_runtime.tokenizers.glm6b import ChatGLMTokenizer

from .conftest import reference_file

REAL_MODEL = reference_file("tokenizers/chatglm-6b-ice_text.model")

CODE = "def main():\n    print('hello world')\t# greeting"
ROUND_TRIPS = [
    "你好",
    CODE,
    "class A:\n    def f(self):\n        if x:\n\t\treturn {'a': [1, 2]}\n\n\n",
    "".join(f"{n}" + " " * n for n in range(2, 101)) + "end",
    "x" + " " * 81 + "y",
    "a" + " " * 160 + "b" + " " * 100,
    "\n\nleading newlines\n\n\n",
    "  two leading spaces, tab\tand\t\ttabs",
    "emoji 😀👍🏽 and 中文混合 text。再见",
    "flags 🇨🇳🇺🇸, accents café naïve, math ∑ ≤ ∞",
    "a \nb \tc",
]


@pytest.fixture(scope="module")
def real():
    return ChatGLMTokenizer(REAL_MODEL)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return ChatGLMTokenizer.from_pretrained(tiny_dir)


def test_real_known_ids(real):
    assert real.encode("你好") == [5, 74874, 130001, 130004]
    assert real.encode(CODE) == [1616, 594, 125936, 4, 130011, 2274, 89, 7283, 398, 125686,
                                 130008, 61, 25672, 130001, 130004]
    assert real.encode("你好", add_special_tokens=False) == [5, 74874]


def test_real_special_ids(real):
    assert (real.mask_token_id, real.gmask_token_id) == (130000, 130001)
    assert (real.bos_token_id, real.eos_token_id) == (130004, 130005)
    assert (real.pad_token_id, real.unk_token_id, real.vocab_size) == (3, 0, 130344)
    assert real.convert_ids_to_tokens([4, 130008, 130009]) == ["<n>", "<|tab|>", "<|blank_2|>"]


def test_real_space_rules(real):
    """A run over 80 spaces is 80 + the rest; a lone single space at either end is dropped by
    SentencePiece's whitespace normalisation, as in the reference."""
    ids = real.encode("a" + " " * 100 + "b", add_special_tokens=False)
    assert real.convert_ids_to_tokens(ids) == ["▁a", "<|blank_80|>", "<|blank_20|>", "b"]
    assert real.encode(" hello ") == real.encode("hello")


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_real_round_trip(real, text):
    assert real.decode(real.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_tiny_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_real_normalisation(real):
    """ice_text.model's nmt_nfkc rules: full-width to ASCII, and the zero-width joiner of emoji
    sequences becomes a space (the tiny model's newer rules keep it)."""
    assert real.decode(real.encode("你好，世界！１２３")) == "你好,世界!123"
    assert real.decode(real.encode("👨\u200d👩")) == "👨 👩"


def test_tiny_layout_mirrors_ice_text(tiny):
    assert tiny.convert_ids_to_tokens(range(5)) == ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    assert (tiny.unk_token_id, tiny.pad_token_id) == (0, 3)
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
    ids = tiny.convert_tokens_to_ids(specials)
    assert ids == list(range(ids[0], ids[0] + 8)) and ids[0] > 100
    assert [tiny.mask_token_id, tiny.gmask_token_id, tiny.bos_token_id, tiny.eos_token_id] == [
        ids[0], ids[1], ids[4], ids[5]]
    blanks = tiny.convert_tokens_to_ids(["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)])
    assert blanks == list(range(ids[0] + 8, ids[0] + 8 + 80))
    assert tiny.convert_ids_to_tokens([tiny.vocab_size - 1]) == ["<0xFF>"]
    assert tiny.encode("你好")[-2:] == [tiny.gmask_token_id, tiny.bos_token_id]
    assert 300 < tiny.vocab_size < 1000


def test_tiny_config(tiny_dir):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<eop>" and config["end_token"] == "</s>"
    assert config["num_image_tokens"] == 0 and config["tokenizer_class"] == "ChatGLMTokenizer"


def test_write_tiny_tokenizer_is_deterministic_and_fast(tmp_path, tiny_dir):
    start = time.perf_counter()
    write_tiny_tokenizer(tmp_path)
    assert time.perf_counter() - start < 2
    for name in ("ice_text.model", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_decode_skips_special_tokens(tiny):
    hello, world = tiny.encode("hello", False), tiny.encode("world", False)
    ids = [tiny.pad_token_id] + hello + [tiny.eos_token_id, tiny.mask_token_id] + world + [
        tiny.gmask_token_id, tiny.bos_token_id]
    assert tiny.decode(ids) == "hello world"
    assert tiny.decode(ids, skip_special_tokens=False) == "<pad>hello<eop>[MASK] world[gMASK]<sop>"
    assert tiny.decode([]) == ""


def test_decode_rejects_unknown_ids(tiny):
    for bad in (-1, tiny.vocab_size):
        with pytest.raises(ValueError, match=str(bad)):
            tiny.decode([5, bad])


def test_vocab_file_from_config(tiny, tiny_dir, tmp_path):
    (tmp_path / "other.model").write_bytes((tiny_dir / "ice_text.model").read_bytes())
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"vocab_file": "other.model"}))
    tokenizer = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert tokenizer.model_file.name == "other.model"
    assert tokenizer.encode("你好 world") == tiny.encode("你好 world")


def test_missing_and_corrupt_files(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        ChatGLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_dir / "tokenizer_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "ice_text.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="ice_text.model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_config_text_options(tiny_dir):
    tokenizer = ChatGLMTokenizer(tiny_dir / "ice_text.model", remove_space=True, do_lower_case=True)
    assert tokenizer.decode(tokenizer.encode("  Hello\n  WORLD  ")) == "hello world"


def test_missing_special_piece(tiny_dir):
    with pytest.raises(ValueError, match="<nope>"):
        ChatGLMTokenizer(tiny_dir / "ice_text.model", gmask_token="<nope>")


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_long_input_is_fast(request, which):
    tokenizer = request.getfixturevalue(which)
    text = ("你好 world,\n    def f(x):\treturn x  # 注释 😀\n" * 3000)[:100_000]
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    text_back = tokenizer.decode(ids)
    assert time.perf_counter() - start < 2
    assert text_back == text


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_control_characters_never_raise(request, which):
    tokenizer = request.getfixturevalue(which)
    text = "a\x00b\x1b[31mred\x1b[0m\r\n\x7f\x0b\x0c\u2028\ufeff\ud800 lone surrogate\udfff"
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert "a\x00b" in tokenizer.decode(ids)
    assert tokenizer.encode("") == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
