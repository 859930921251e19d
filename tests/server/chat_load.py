"""A closed loop of greedy chat requests against a real server, for tests that change the cluster
while requests flow (role switches): every answer is kept with its prompt, so a test can check that
nothing was lost, duplicated or changed."""

from __future__ import annotations

import threading
import time

import httpx


class ChatLoad:
    """`workers` threads, each sending the next of `prompts` (cycling) until the block ends; each
    answer is `max_tokens` greedy tokens (ignore_eos) with their ids."""

    def __init__(
        self, url: str, key: str, prompts: list, max_tokens: int, wait_s: float, workers: int = 3
    ) -> None:
        self.url, self.key, self.prompts = url, key, prompts
        self.max_tokens, self.wait_s, self.workers = max_tokens, wait_s, workers
        self.results: list[tuple[int, list[int], str | None]] = []  # (prompt, token ids, finish)
        self.errors: list[str] = []
        self.sent = 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True) for w in range(workers)]

    def __enter__(self) -> ChatLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.wait_s)

    def _work(self, k: int) -> None:
        with httpx.Client(timeout=self.wait_s, headers={"Authorization": f"Bearer {self.key}"}) as client:
            while not self._stop.is_set():
                prompt = k % len(self.prompts)
                k += self.workers
                body = {"model": "m", "messages": self.prompts[prompt], "max_tokens": self.max_tokens}
                body |= {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
                with self._lock:
                    self.sent += 1
                try:
                    resp = client.post(self.url + "/v1/chat/completions", json=body)
                    choice = resp.json()["choices"][0]
                    result = (prompt, choice["token_ids"], choice["finish_reason"])
                except Exception as err:  # recorded: the test fails on any
                    with self._lock:
                        self.errors.append(f"{type(err).__name__}: {err}")
                    continue
                with self._lock:
                    self.results.append(result)

    def wait_for(self, n: int) -> None:
        """Until `n` answers came in (requests are flowing)."""
        deadline = time.monotonic() + self.wait_s
        while len(self.results) < n and not self.errors:
            assert time.monotonic() < deadline, f"{len(self.results)} of {n} answers within {self.wait_s} s"
            time.sleep(0.01)

    def check(self, reference: list[list[int]]) -> None:
        """No error, one answer per request sent, each with the reference tokens of its prompt."""
        assert not self.errors, self.errors[:3]
        assert len(self.results) == self.sent, "every request sent got exactly one answer"
        for prompt, tokens, finish in self.results:
            assert finish == "length" and tokens == reference[prompt], f"prompt {prompt}"
