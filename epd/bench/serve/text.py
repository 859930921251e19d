"""Prompt text of a given length in tokens.

With the model's tokenizer (tokenizer.json of a local model directory) the length is exact
up to merges at the cut, which a few retries remove; without one, one English word is
counted as one token, which is close for real BPE vocabularies and common words.
"""

from __future__ import annotations

import random
from pathlib import Path

# Common words: realistic text, and almost all of them a single token in real vocabularies.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their been has would when if more will no out "
    "so said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go "
    "came right used take three picture image colour shape left red green blue yellow small large"
).split()


class PromptText:
    def __init__(self, tokenizer_dir: str | None) -> None:
        self.tokenizer = _load_tokenizer(tokenizer_dir)

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str, int | None]:
        """Text of about `num_tokens` tokens, and its exact count when a tokenizer is loaded."""
        if num_tokens <= 0:
            return "", 0
        words = " ".join(rng.choice(WORDS) for _ in range(num_tokens + 8))
        if self.tokenizer is None:
            return " ".join(words.split()[:num_tokens]), None
        return self._exact(words, num_tokens)

    def _exact(self, words: str, num_tokens: int) -> tuple[str, int]:
        ids = self.tokenizer.encode(words, add_special_tokens=False).ids
        want, count, text = num_tokens, 0, ""
        for _ in range(4):  # decoding a cut can merge differently: trim until it re-encodes to the target
            text = self.tokenizer.decode(ids[:want])
            count = len(self.tokenizer.encode(text, add_special_tokens=False).ids)
            if count <= num_tokens:
                break
            want -= count - num_tokens
        return text, count


def _load_tokenizer(tokenizer_dir: str | None):  # -> tokenizers.Tokenizer | None
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
