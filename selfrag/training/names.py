"""Names from wide distributions, for training a pretrained model to read rather than guess.

The miniature model's names are two or three syllables from one 150-syllable inventory,
so it learned those syllables, not reading. A model trained here must copy whatever the
passage says, so names come from many *styles*: syllable inventories in the manner of
several languages (with their diacritics), arbitrary letters, letters with digits, and
several words. ``name(style, rng)`` draws one; ``place``/``person`` pick a style first.

``HELDOUT_STYLES`` are never drawn for training (``split="train"``); the evaluation of the
next issue asks about entities named in them, which no training example resembled.
"""

from __future__ import annotations

import random
import string

# Syllable inventories: (onsets, vowels, codas), in the manner of a language family. Each
# name style joins 2-4 of its syllables.
_INVENTORIES = {
    "japanese": (("k", "s", "t", "n", "h", "m", "y", "r", "w", "g", "z", "d", "b", "sh", "ch", ""),
                 ("a", "i", "u", "e", "o", "ō", "ū"), ("", "", "", "n")),
    "bantu": (("mb", "nd", "ng", "k", "w", "m", "n", "z", "t", "l", "b", "ny", "ch", "s"),
              ("a", "e", "i", "o", "u"), ("",)),
    "finnic": (("k", "h", "j", "l", "m", "n", "p", "r", "s", "t", "v", ""),
               ("a", "e", "i", "o", "u", "y", "ä", "ö", "aa", "ii"), ("", "", "n", "s", "l", "t", "kk")),
    "slavic": (("b", "br", "č", "d", "dr", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "š", "t", "v", "z",
                "ž", "zd", "st", "pr"), ("a", "e", "i", "o", "u", "á", "ě", "í", "y"),
               ("", "", "v", "n", "k", "č", "r", "l", "š")),
    "romance": (("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "ll", "ch", "gu", ""),
                ("a", "e", "i", "o", "u", "á", "é", "ó", "ia", "ue"), ("", "", "n", "s", "r", "l")),
    "semitic": (("b", "d", "f", "h", "j", "k", "kh", "l", "m", "n", "q", "r", "s", "sh", "t", "z", "'"),
                ("a", "i", "u", "ā", "ī", "ū"), ("", "", "m", "n", "r", "d", "b")),
    "germanic": (("b", "br", "d", "f", "g", "gr", "h", "k", "l", "m", "n", "r", "s", "sch", "st", "w", "th"),
                 ("a", "e", "i", "o", "u", "ei", "au", "ü", "ö"),
                 ("", "n", "r", "ld", "rg", "ck", "nd", "ss", "lt")),
    "sinitic": (("b", "ch", "d", "f", "g", "h", "j", "l", "m", "n", "q", "s", "sh", "t", "x", "y", "zh", "w"),
                ("a", "ai", "ao", "e", "ei", "i", "ia", "ing", "o", "ong", "u", "ua", "uan"), ("", "", "n")),
    # Held out: never drawn for training.
    "polynesian": (("h", "k", "l", "m", "n", "p", "w", "", "'"), ("a", "e", "i", "o", "u", "ā", "ō"), ("",)),
    "turkic": (("b", "ç", "d", "g", "k", "ğ", "l", "m", "n", "r", "s", "ş", "t", "y", "z"),
               ("a", "e", "ı", "i", "o", "ö", "u", "ü"), ("", "n", "r", "l", "k", "z", "ş")),
    "celtic": (("bh", "c", "d", "dh", "g", "l", "m", "n", "r", "s", "t", "f", "mh"),
               ("a", "ai", "ea", "ei", "io", "o", "ua", "á", "ó"), ("", "nn", "ch", "dh", "ll", "rr", "n")),
}
_DIACRITIC = "áàâäãåçéèêëíìîïñóòôöõøúùûüýÿšžčćđłńśźżőű"


def _syllabic(inventory: str):
    onsets, vowels, codas = _INVENTORIES[inventory]

    def draw(rng: random.Random) -> str:
        n = rng.choice((2, 2, 3, 3, 4))
        return "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n)).strip("'")
    return draw


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


def _diacritics(rng: random.Random) -> str:
    pool = string.ascii_lowercase + _DIACRITIC
    return "".join(rng.choice(pool) for _ in range(rng.randint(3, 8)))


def _alnum(rng: random.Random) -> str:
    head = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(1, 3)))
    return rng.choice((f"{head}-{rng.randint(1, 999)}", f"{head}{rng.randint(2, 99)}",
                       f"{_letters(rng)}-{rng.randint(1, 99)}"))


def _hyphen_digits(rng: random.Random) -> str:                   # held out
    return f"{_letters(rng)} {rng.randint(100, 9999)}"


STYLES = {**{k: _syllabic(k) for k in _INVENTORIES}, "letters": _letters, "diacritics": _diacritics,
          "alnum": _alnum, "number_suffix": _hyphen_digits}
HELDOUT_STYLES = ("polynesian", "turkic", "celtic", "number_suffix")
TRAIN_STYLES = tuple(s for s in STYLES if s not in HELDOUT_STYLES)


def _cap(word: str) -> str:
    return word[:1].upper() + word[1:]


def styles(split: str) -> tuple:
    if split == "train":
        return TRAIN_STYLES
    if split == "heldout":
        return HELDOUT_STYLES
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def word(style: str, rng: random.Random) -> str:
    return _cap(STYLES[style](rng))


def place(rng: random.Random, split: str) -> str:
    """A place name: one word mostly, sometimes two ("Nova Kestrel"), in a style of ``split``."""
    style = rng.choice(styles(split))
    if rng.random() < 0.25:
        return f"{word(style, rng)} {word(style, rng)}"
    return word(style, rng)


def person(rng: random.Random, split: str) -> str:
    """A person: given and family name (sometimes a middle one, or a particle)."""
    style = rng.choice(styles(split))
    parts = [word(style, rng), word(style, rng)]
    r = rng.random()
    if r < 0.15:
        parts.insert(1, word(style, rng))
    elif r < 0.25:
        parts.insert(1, rng.choice(("van", "de", "al", "von", "da", "bin", "ter")))
    return " ".join(parts)
