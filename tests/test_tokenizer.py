"""engine.tokenizer.sentencepiece_tokenizer / engine.tokenizer.detokenizer against transformers' AutoTokenizer.

Every expected value comes from ``AutoTokenizer.from_pretrained`` on the same
directory (built by ``selfrag.default_tokenizer.build_tokenizer``), never from
the code under test.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.errors import CheckpointError
from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
from selfrag.default_tokenizer import DEFAULT_CORPUS, build_tokenizer
from selfrag.tokens import ADDED_TOKENS, ADDITIONAL_SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")
VOCAB = 1000
CORPUS_WORDS = DEFAULT_CORPUS.read_text(encoding="utf-8").split()
SPECIALS = ["<s>", "</s>", "<unk>", *ADDED_TOKENS]
PIECES_OF_TEXT = [" ", "  ", "\n", "\n\n", "\t", " \n ", "é", "ñ", "—", "“", "”", "羊驼", "🦙", "🙂", "ß", "Ω",
                  "\u00a0", "\u2581", "0", "42", "3.14", "1,000", "<", ">", "[", "]", "/", "\r\n"]

HAND_STRINGS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n",
    "Hello world", "hello", " hello", "  hello", "hello ", "hello  ", "hello   world", "a b  c   d",
    "tab\tseparated\tvalues", "\tleading tab", "line one\nline two", "trailing newline\n", "\nleading newline",
    "<s>", "</s>", "<unk>", "<pad>", "<s>Hello", "<s> Hello", "Hello</s>", "Hello </s>", "<s></s>",
    "A prompt with <s> inside and </s> at the end</s>", "x<s>y", "< s>", "<s", "s>", "<<s>>",
    "[Retrieval]", "[No Retrieval]", "[Retrieval]<paragraph>", "[Retrieval]<paragraph>Llamas eat grass.</paragraph>",
    "[Retrieval] <paragraph> Llamas eat grass. </paragraph> ", "Answer:[Relevant]Yes[Fully supported][Utility:5]",
    "Answer: [Relevant] Yes [Partially supported] [Utility:3]</s>", "[No support / Contradictory]",
    "[Continue to Use Evidence]The end.", "[Irrelevant]\n[Utility:1]", "[Utility:2][Utility:4]",
    "[Retrieval", "Retrieval]", "[retrieval]", "[Utility:6]", "<paragraph>x</paragraph>y", "</paragraph>",
    "### Instruction:\nWhat do llamas eat?\n\n### Response:\n",
    "### Instruction:\nName a camelid.\n\n### Response:\n[Retrieval]<paragraph>Alpacas are camelids.</paragraph>",
    "2023", "12345678901234567890", "3.14159", "1,234,567 llamas", "-10 °C", "x=1+2*3",
    "café jalapeño naïve Zürich São Paulo", "Señor Lana — the “best” llama", "羊驼 means alpaca", "ラマ 라마",
    "🦙", "a 🦙 b", "🦙🦙🦙", "emoji at end 🙂", "\u00a0non-breaking", "zero\u200bwidth", "\u2581literal underline",
    "\u2581", "Ω≈ç√∫", "ẞ İ ﬁ", "e\u0301", "\x00\x01\x7f", "\ufeffBOM", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "What's the llama's name? It's Inti!", "(parentheses) [brackets] {braces}", "quotes: 'single' \"double\"",
]


def _hf(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _variant(base: Path, out: Path, drop=(), **changes) -> Path:
    shutil.copytree(base, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(changes)
    for key in drop:
        del cfg[key]
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for legacy in (False, True):
        d = root / f"legacy_{legacy}"
        build_tokenizer(d, vocab_size=VOCAB, legacy=legacy)
        dirs[legacy] = d
    return dirs


@pytest.fixture(scope="session", params=[False, True], ids=["nonlegacy", "legacy"])
def pair(request, tok_dirs):
    d = tok_dirs[request.param]
    return _hf(d), Tokenizer.from_pretrained(d)


def _random_strings(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pools = [CORPUS_WORDS, SPECIALS, PIECES_OF_TEXT]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            pool = rng.choices(pools, weights=[6, 2, 2])[0]
            parts.append(rng.choice(pool) + rng.choice(["", "", " ", "  ", "\n"]))
        out.append("".join(parts))
    return out


# ----------------------------------------------------------------- encoding
@pytest.mark.parametrize("text", HAND_STRINGS)
def test_encode_hand_strings(pair, text):
    hf, mine = pair
    expected = hf(text)["input_ids"]
    assert mine.encode(text) == expected
    assert mine.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]


def test_encode_random_mixtures(pair):
    hf, mine = pair
    for text in _random_strings(seed=1234, n=1500):
        assert mine.encode(text) == hf(text)["input_ids"], repr(text)


def test_encode_corpus_slices(pair):
    hf, mine = pair
    corpus = DEFAULT_CORPUS.read_text(encoding="utf-8")
    rng = random.Random(7)
    for _ in range(400):
        start = rng.randrange(len(corpus))
        text = corpus[start:start + rng.randint(0, 300)]
        assert mine.encode(text) == hf(text)["input_ids"], repr(text)


_text_strategy = st.lists(
    st.one_of(st.sampled_from(CORPUS_WORDS[:2000]), st.sampled_from(SPECIALS), st.sampled_from(PIECES_OF_TEXT),
              st.text(max_size=6)),
    max_size=10,
).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_text_strategy)
def test_encode_hypothesis(pair, text):
    hf, mine = pair
    assert mine.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("changes", [
    {"add_bos_token": False},
    {"add_eos_token": True},
    {"add_bos_token": False, "add_eos_token": True, "legacy": True},
    {"add_prefix_space": False},
    {"drop": ["add_bos_token", "legacy"]},
    {"drop": ["added_tokens_decoder", "additional_special_tokens"]},
], ids=["no_bos", "eos", "legacy_eos_only", "no_prefix_space", "keys_absent", "old_layout"])
def test_config_variants(tok_dirs, tmp_path, changes):
    """Config flags HF honours (missing add_bos_token means False in HF 5!)."""
    d = _variant(tok_dirs[False], tmp_path / "variant", **changes)
    hf, mine = _hf(d), Tokenizer.from_pretrained(d)
    assert mine.add_bos_token == hf.add_bos_token and mine.add_eos_token == hf.add_eos_token
    assert sorted(mine.all_special_ids) == sorted(hf.all_special_ids)
    for text in HAND_STRINGS + _random_strings(seed=99, n=200):
        ids = hf(text)["input_ids"]
        assert mine.encode(text) == ids, repr(text)
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), repr(text)


# ----------------------------------------------------------------- decoding
def test_decode_roundtrip_matches_hf(pair):
    hf, mine = pair
    for text in HAND_STRINGS + _random_strings(seed=5, n=300):
        ids = hf(text)["input_ids"]
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), repr(text)


def test_decode_random_ids_matches_hf(pair):
    hf, mine = pair
    rng = random.Random(11)
    n = len(hf)
    for _ in range(1500):
        # Bias towards byte-fallback pieces (ids 3..258) to exercise partial UTF-8.
        ids = [rng.randrange(n) if rng.random() < 0.6 else rng.randrange(3, 259) for _ in range(rng.randint(0, 10))]
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


# ------------------------------------------------------ vocabulary and files
def test_added_tokens_are_single_ids_from_files(pair, tok_dirs):
    hf, mine = pair
    added_json = json.loads((tok_dirs[False] / "added_tokens.json").read_text(encoding="utf-8"))
    assert list(added_json) == ADDED_TOKENS
    assert list(added_json.values()) == list(range(VOCAB, VOCAB + len(ADDED_TOKENS)))
    for tok, tok_id in added_json.items():
        assert mine.convert_tokens_to_ids(tok) == tok_id == hf.convert_tokens_to_ids(tok)
        assert mine.convert_ids_to_tokens(tok_id) == tok
        assert mine.encode(tok, add_special_tokens=False) == [tok_id] == hf(tok, add_special_tokens=False)["input_ids"]
    assert len(mine) == mine.vocab_size == len(hf) == VOCAB + 16
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(mine, name) == getattr(hf, name), name
    assert sorted(mine.all_special_ids) == sorted(hf.all_special_ids)
    assert mine.added_tokens_encoder == hf.added_tokens_encoder
    assert set(ADDITIONAL_SPECIAL_TOKENS) <= {mine.convert_ids_to_tokens(i) for i in mine.all_special_ids}
    assert mine.add_bos_token is True and mine.add_eos_token is False
    ids = list(range(len(hf)))
    assert mine.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_build_is_deterministic(tmp_path, tok_dirs):
    build_tokenizer(tmp_path / "again", vocab_size=VOCAB, legacy=False)
    for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tok_dirs[False] / name).read_bytes(), name


def test_engine_has_no_selfrag_strings():
    root = Path(__file__).resolve().parents[1] / "engine"
    for path in (root / "tokenizer" / "sentencepiece_tokenizer.py", root / "tokenizer" / "detokenizer.py"):
        src = path.read_text(encoding="utf-8")
        for tok in ADDED_TOKENS[:-1]:
            assert tok not in src, (path, tok)


# -------------------------------------------------------------- detokenizer
def _byte_id(mine, b: int) -> int:
    return mine.convert_tokens_to_ids(f"<0x{b:02X}>")


def _random_generation(mine, rng):
    """Ids in units; a unit is one normal piece, one special, or the bytes of one char.

    Returns (ids, boundaries) where boundaries[k] says whether ids[:k] ends on a unit.
    Skippable specials are sometimes put *inside* a byte run.
    """
    chars = ["é", "—", "羊", "🦙", "𝔘", "ñ", "a", "\n"]
    specials = [mine.bos_token_id, mine.eos_token_id, *(mine.convert_tokens_to_ids(t) for t in ADDED_TOKENS)]
    ids, boundaries = [], [True]
    for _ in range(rng.randint(1, 25)):
        kind = rng.random()
        if kind < 0.4:
            unit = [rng.randrange(259, VOCAB)]
        elif kind < 0.55:
            unit = [rng.choice(specials)]
        else:
            unit = [_byte_id(mine, b) for b in rng.choice(chars).encode("utf-8")]
            if len(unit) > 1 and rng.random() < 0.3:
                unit.insert(rng.randrange(1, len(unit)), rng.choice(specials))
        ids.extend(unit)
        boundaries.extend([False] * (len(unit) - 1) + [True])
    return ids, boundaries


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_matches_hf_decode(pair, skip):
    hf, mine = pair
    rng = random.Random(3 + skip)
    for _ in range(300):
        ids, boundaries = _random_generation(mine, rng)
        detok = IncrementalDetokenizer(mine, skip_special_tokens=skip)
        joined = ""
        for k, tok in enumerate(ids, start=1):
            delta = detok.add(tok)
            if skip:  # only a kept special inside a byte run can break a character
                assert "\ufffd" not in delta
            joined += delta
            if boundaries[k]:
                expected = hf.decode(ids[:k], skip_special_tokens=skip)
                # A kept special inside a byte run breaks the character in HF
                # too; HF then replaces the whole run (see the flush test), so
                # compare where HF's text has no replacement characters.
                if "\ufffd" not in expected:
                    assert joined == expected == detok.text, ids[:k]
        assert joined + detok.flush() == detok.text


def test_detokenizer_never_splits_multibyte(pair):
    hf, mine = pair
    for text in ["🦙", "羊驼", "a🦙b", "—é", "𝔘𝔫"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        detok = IncrementalDetokenizer(mine)
        deltas = [detok.add(i) for i in ids]
        assert "".join(deltas) == hf.decode(ids, skip_special_tokens=True) == text
        for d in deltas:
            assert "\ufffd" not in d


def test_detokenizer_leading_space_and_prompt(pair):
    hf, mine = pair
    gen = hf(" The llama eats grass.", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(mine)
    assert "".join(detok.add(i) for i in gen) == hf.decode(gen, skip_special_tokens=True)
    assert not detok.text.startswith(" ")
    prompt = hf("### Instruction:\nWhat do llamas eat?\n\n### Response:\n")["input_ids"]
    rng = random.Random(17)
    for _ in range(100):
        gen = [rng.randrange(259, VOCAB) for _ in range(rng.randint(1, 8))]
        detok = IncrementalDetokenizer(mine, prompt_token_ids=prompt)
        joined = "".join(detok.add(i) for i in gen)
        full, head = hf.decode(prompt + gen, skip_special_tokens=True), hf.decode(prompt, skip_special_tokens=True)
        assert full.startswith(head) and joined == full[len(head):]


def test_detokenizer_incomplete_bytes_flush(pair):
    hf, mine = pair
    ids = [_byte_id(mine, b) for b in "🦙".encode("utf-8")[:2]]
    detok = IncrementalDetokenizer(mine)
    assert [detok.add(i) for i in ids] == ["", ""]
    assert detok.flush() == hf.decode(ids) == "\ufffd\ufffd"
    # Documented corner: HF replaces the *whole* invalid run (including the
    # finished "é") by U+FFFD per byte; the detokenizer already emitted "é".
    bad = [_byte_id(mine, b) for b in (0xC3, 0xA9, 0xFF)]
    assert hf.decode(bad) == "\ufffd" * 3
    detok = IncrementalDetokenizer(mine)
    assert "".join(detok.add(i) for i in bad) + detok.flush() == "é\ufffd"


# ------------------------------------------------------------------- errors
def test_missing_model_file(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"])
def test_malformed_json(tok_dirs, tmp_path, name):
    d = tmp_path / "broken"
    shutil.copytree(tok_dirs[False], d)
    (d / name).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=name):
        Tokenizer.from_pretrained(d)


def test_corrupt_model_file(tok_dirs, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(tok_dirs[False], d)
    (d / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        Tokenizer.from_pretrained(d)


def test_unknown_id_raises(pair):
    _, mine = pair
    with pytest.raises(ValueError):
        mine.convert_ids_to_tokens(len(mine) + 5)
