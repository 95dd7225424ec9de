"""Turning emitted token bytes into text: incremental UTF-8 decoding and stop strings."""

from __future__ import annotations

import codecs


class TextStream:
    """Incremental detokenizer with stop strings: returns the text that is safe to show now,
    holding back a tail that could still turn into a stop string."""

    def __init__(self, stop: tuple[str, ...]):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        text = self._held + self._decoder.decode(data)
        # The earliest stop string in the text ends it (one push may hold several).
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def would_stop(self, data: bytes) -> bool:
        """Whether pushing `data` next would reach a stop string (the stream is left as it was)."""
        if not self.stop:
            return False
        state = self._decoder.getstate()
        text = self._held + self._decoder.decode(data)
        self._decoder.setstate(state)
        return any(s in text for s in self.stop)

    def flush(self) -> str:
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out
