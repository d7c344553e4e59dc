"""A row's text on its way out: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medgemma.engine.sampling import partial_stop_suffix


@dataclass
class TextOut:
    """Turns a row's generated ids into text deltas (prefix/read offsets, as TGI and vLLM do it).

    The final text of a row whose text was streamed, or cut at a stop string, is exactly the concatenation of its
    deltas: byte-level tokens that are not valid UTF-8 decode differently in a window than in the whole sequence, so
    re-decoding everything at the end could contradict what the client already has. A row nobody streams is decoded
    once, at the end.
    """

    decode: Callable[[list[int]], str]
    emit: Callable[[str], None]
    stops: tuple[str, ...] = ()
    prefix_offset: int = 0
    read_offset: int = 0
    emitted: str = ""
    held: str = ""  # decoded text withheld because it may be the start of a stop string
    stopped: bool = False  # a stop string was found

    def feed(self, ids: list[int], *, final: bool = False) -> None:
        """Emit what the ids decode to beyond what was emitted; ``final`` flushes a possibly unfinished character."""
        prefix = self.decode(ids[self.prefix_offset : self.read_offset])
        full = self.decode(ids[self.prefix_offset :])
        if not final and full.endswith("\ufffd") and len(ids) - self.read_offset < 4:
            return  # maybe a multi-byte character still arriving (UTF-8 needs at most 4 byte tokens): wait
        if len(full) <= len(prefix):
            return
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self._push(full[len(prefix) :])

    def _push(self, delta: str) -> None:
        """Send ``delta``, holding back any tail that may be the start of a stop string."""
        pending = self.held + delta
        if self.stops:
            combined = self.emitted + pending
            start = max(0, len(self.emitted) - max(len(s) for s in self.stops))
            hits = [at for at in (combined.find(s, start) for s in self.stops) if at != -1]
            if hits:
                self.held, self.stopped = "", True
                self._send(combined[len(self.emitted) : min(hits)])
                return
            keep = min(partial_stop_suffix(combined, self.stops), len(pending))
            pending, self.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._send(pending)

    def _send(self, text: str) -> None:
        if text:
            self.emitted += text
            self.emit(text)

    def finish(self, ids: list[int], *, streamed: bool, cancelled: bool) -> str:
        """The row's final text; anything the client has not been sent yet goes out first (unless cancelled)."""
        if cancelled:
            return self.emitted
        if streamed or self.stops:
            if not self.stopped:
                self.feed(ids, final=True)
            if self.held and not self.stopped:
                held, self.held = self.held, ""
                self._send(held)  # a possible stop string that never completed is ordinary text
            return self.emitted
        text = self.decode(ids)
        self._send(text[len(self.emitted) :] if text.startswith(self.emitted) else "")
        return text
